"""Fixtures for the fleet tests: real keys, fake model folders, a real amqtt broker on a free port, a real fleet
app (SQLite file in tmp_path, authentication on, the bootstrap admin token sent by `client`) behind FastAPI's
TestClient, and paho clients that play devices. A test marked `@pytest.mark.both_databases` runs twice, the second
time with the fleet on a fresh PostgreSQL database."""

from __future__ import annotations

import io
import os
import random
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import uvicorn
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.broker import EmbeddedBroker
from fleet.bundles import build_bundle
from fleet.settings import Settings
from protocol import bundle as container
from protocol.trust import PrivateKey, generate_keypair
from tests.net import FLEET_PASSWORD, embedded_broker, free_port, login, wait_port

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
ADMIN_TOKEN = "slm_" + secrets.token_urlsafe(32)  # the bootstrap admin of every test fleet
BROKER_PASSWORD = FLEET_PASSWORD  # the test fleet's own MQTT password (tests.net's broker accounts know it)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def secure_settings(data_dir: Path, trusted: PrivateKey | None = None, **kwargs: object) -> Settings:
    """Settings a fleet may start with outside demo mode: real secrets and a trusted bundle key (`trusted`'s, or a
    fresh one's) written next to the data folder."""
    pub = data_dir.parent / f"trusted-{os.urandom(3).hex()}.pub"
    pub.parent.mkdir(parents=True, exist_ok=True)
    pub.write_bytes((trusted or generate_keypair()).public.to_pem())
    return Settings(
        data_dir=data_dir, admin_token=ADMIN_TOKEN, broker_password=BROKER_PASSWORD, trusted_keys=[pub], **kwargs  # type: ignore[arg-type]
    )


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def make_model_dir(root: Path, *, eval_doc: str | None = None, seed: int = 0) -> Path:
    """A fake exported model folder: random bytes in a nested layout, optionally with eval.json."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(rng.randbytes(4096))
    (root / "model.onnx.data").write_bytes(rng.randbytes(20_000))
    (root / "genai_config.json").write_text('{"model": {"type": "fake"}}')
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
    if eval_doc is not None:
        (root / "eval.json").write_text(eval_doc)
    return root


def member_offset(bundle: Path, member: str) -> int:
    """Byte offset of a member's data inside an (uncompressed) bundle file."""
    with tarfile.open(bundle) as tar:
        return tar.getmember(member).offset_data


def flip_byte(bundle: Path, member: str, at: int = 10) -> None:
    offset = member_offset(bundle, member) + at
    with bundle.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def rewrite_envelope(bundle: Path, envelope: bytes) -> None:
    """Replace a bundle's envelope, keeping its model files byte for byte."""
    with tarfile.open(bundle) as tar:
        files = [
            (m.name.removeprefix("model/"), io.BytesIO(tar.extractfile(m).read()), m.size)  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.startswith("model/")
        ]
    buf = io.BytesIO()
    container.write_bundle(buf, envelope, files)
    bundle.write_bytes(buf.getvalue())


@pytest.fixture
def key() -> PrivateKey:
    return generate_keypair()


@pytest.fixture
def other_key() -> PrivateKey:
    return generate_keypair()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(
        tmp_path / "model",
        eval_doc='{"dataset": "ref-task", "metrics": {"accuracy": 0.91}, "smoke": [{"prompt": "2+2=", "expect": "4"}]}',
    )


@pytest.fixture
def make_bundle(tmp_path: Path, model_dir: Path, key: PrivateKey) -> Callable[..., Path]:
    def make(name: str = "tiny", version: int = 1, *, signers: list[PrivateKey] | None = None, src: Path | None = None) -> Path:
        out = tmp_path / "out" / f"{name}-{version}-{os.urandom(3).hex()}.bundle"
        build_bundle(src or model_dir, out, name=name, version=version, signers=[key] if signers is None else signers,
                     now=NOW, expires=NOW + timedelta(days=3650))  # NOW is fixed; uploads are checked on today's clock
        return out

    return make


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with embedded_broker() as b:
        yield b


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedBroker, key: PrivateKey, db_backend: str, request: pytest.FixtureRequest) -> Settings:
    """A fleet that trusts `key` (the signer of `make_bundle`), with the test admin token and broker password; its
    database is the SQLite file in its data folder, or a fresh PostgreSQL database for a test marked
    `both_databases` in its postgresql run (tests/conftest.py)."""
    database = {} if db_backend == "sqlite" else {"database_url": request.getfixturevalue("backend_url")}
    return secure_settings(
        tmp_path / "fleet", key, broker_url=broker.url, public_url="http://fleet.test:8700", client_id="slmops-fleet-test",
        **database,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The fleet's app; every request carries the bootstrap admin token unless a test sends its own header."""
    with TestClient(create_app(settings), headers=ADMIN) as c:
        assert c.app.state.fleet.messaging.wait_connected(5), "fleet did not subscribe on the test broker"
        yield c


class Device:
    """A paho client standing in for a device's agent (`slmops-agent-<id>`), the fleet (`slmops-fleet-...`) or an
    anonymous peer, with the credentials `tests.net.login` gives that client id."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        loop: bool = True,
        clean_session: bool = True,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subscribed.set()
        username, password = login(client_id)
        if username is not None:
            c.username_pw_set(username, password)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.connect("127.0.0.1", port, keepalive=60)
        self.client, self.looping = c, loop
        if loop:
            c.loop_start()
        else:
            deadline = time.monotonic() + 5
            while not c.is_connected() and time.monotonic() < deadline:
                c.loop(0.05)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, 1)
        assert self._subscribed.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if self.looping:
            info.wait_for_publish(5)
        else:
            deadline = time.monotonic() + 5
            while not info.is_published() and time.monotonic() < deadline:
                self.client.loop(0.05)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def received(self) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        if self.looping:
            self.client.disconnect()
            self.client.loop_stop()
        else:
            self.client.disconnect()


@pytest.fixture
def devices(broker: EmbeddedBroker) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(client_id: str, **kwargs: object) -> Device:
        d = Device(broker.port, client_id, **kwargs)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def live_fleet(settings: Settings) -> Iterator[str]:
    """The fleet app served by uvicorn on a free loopback port; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
