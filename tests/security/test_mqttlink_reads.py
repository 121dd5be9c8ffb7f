"""mqttlink's buffered reads against paho's own, on a real socket pair: the same packets, split at every possible
point and in bursts, come out as the same messages in the same order; a connection closed mid-packet is seen as
closed; a new socket never sees the old one's bytes."""

from __future__ import annotations

import random
import socket
import struct

import paho.mqtt.client as mqtt
import pytest

from mqttlink.buffered import READ_CHUNK, BufferedClient


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0."""
    body = struct.pack("!H", len(topic)) + topic.encode() + payload
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x30" + length + body


def received(kind: type, chunks: list[bytes]) -> list[tuple[str, bytes]]:
    """Feed `chunks` one by one into a client's socket, calling loop_read after each as paho's loop would (again
    while it still makes progress: select() would wake it while bytes wait); the messages it delivered."""
    a, b = socket.socketpair()
    a.setblocking(False)
    c = kind(mqtt.CallbackAPIVersion.VERSION2, client_id="t")
    got: list[tuple[str, bytes]] = []
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    c._sock = a  # a connected client's socket, as paho keeps it
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    try:
        for chunk in chunks:
            b.sendall(chunk)
            idle = 0
            while idle < 3:
                before = len(got)
                assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
                idle = idle + 1 if len(got) == before else 0
        return got
    finally:
        a.close()
        b.close()


MESSAGES = [(f"slmops/v1/devices/d{i}/status", bytes([i % 256]) * (i * 37 % 700)) for i in range(60)]
STREAM = b"".join(publish_packet(t, p) for t, p in MESSAGES)


@pytest.mark.parametrize("cut", ["whole", "bytes-of-1-to-7", "random", "over-a-chunk"])
def test_buffered_reads_deliver_what_paho_delivers(cut: str) -> None:
    rng = random.Random(cut)
    if cut == "whole":
        chunks = [STREAM]
    elif cut == "bytes-of-1-to-7":
        chunks, i = [], 0
        while i < len(STREAM):
            n = rng.randint(1, 7)
            chunks.append(STREAM[i:i + n])
            i += n
    elif cut == "random":
        points = sorted(rng.sample(range(1, len(STREAM)), 25))
        chunks = [STREAM[i:j] for i, j in zip([0, *points], [*points, len(STREAM)])]
    else:
        big = publish_packet("slmops/v1/devices/big/telemetry", b"x" * (READ_CHUNK + 1000))  # over one recv()
        stream = STREAM + big + STREAM
        cut_at = len(STREAM) + READ_CHUNK - 100
        chunks = [stream[:cut_at], stream[cut_at:]]
    expected = received(mqtt.Client, chunks)
    assert received(BufferedClient, chunks) == expected
    assert [t for t, _ in expected[:3]] == [t for t, _ in MESSAGES[:3]]


def test_a_connection_closed_mid_packet_reads_as_lost() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    c = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t")
    c._sock = a
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    got: list[str] = []
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    b.sendall(STREAM[:len(publish_packet(*MESSAGES[0])) + 5])  # the first message, then a part of the second
    b.close()
    rcs = [c.loop_read() for _ in range(3)]
    assert got == [MESSAGES[0][0]]
    assert mqtt.MQTT_ERR_CONN_LOST in rcs, f"a closed socket must read as a lost connection, got {rcs}"


def test_a_new_socket_starts_with_an_empty_buffer() -> None:
    c = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t")
    a, b = socket.socketpair()
    a.setblocking(False)
    c._sock = a
    b.sendall(b"abcdef")
    assert c._sock_recv(2) == b"ab"
    a2, b2 = socket.socketpair()
    a2.setblocking(False)
    c._sock = a2  # reconnected: "cdef" belonged to the old connection
    b2.sendall(b"XY")
    assert c._sock_recv(4) == b"XY"
    for s in (a, b, a2, b2):
        s.close()
