"""`BufferedClient`: paho's client, reading its socket in large chunks.

paho 2.2 reads one packet per wake-up of its loop and asks the socket for a packet's header one byte at a time, so
each inbound message costs several recv() system calls and a select(). Here `_sock_recv` serves those small reads
from a buffer filled by one recv() of up to READ_CHUNK bytes, and `loop_read` keeps handling packets while the
buffer holds data (which the next select() could not see), at most MAX_PACKETS_PER_WAKE per call, so a burst of
reports costs a few system calls instead of several per message. The buffer belongs to one socket: a reconnect
starts empty. Everything else is paho's (TLS, errors, a closed connection reading as b"").
"""

from __future__ import annotations

import paho.mqtt.client as mqtt

READ_CHUNK = 64 * 1024  # bytes asked of the socket per recv()
MAX_PACKETS_PER_WAKE = 1000  # packets one loop_read handles from the buffer before paho's loop gets a turn


class BufferedClient(mqtt.Client):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._rsock:  # a new connection: nothing of the old one carries over
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)  # BlockingIOError when nothing waits; b"" when closed
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos:end]
        self._rpos += len(chunk)
        return chunk

    def _buffered(self) -> bool:
        return self._sock is not None and self._sock is self._rsock and self._rpos < len(self._rbuf)

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(MAX_PACKETS_PER_WAKE):
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or not self._buffered():
                break
            rc = super().loop_read(1)
        return rc
