"""Loopback helpers for tests: free ports, broker accounts for tests, and a real mosquitto broker when installed.

Broker accounts: `TestAccounts` is an `Authenticator` (and `BrokerAccounts`) that admits the fleet with
`FLEET_PASSWORD` and any device whose password is `device_password(device_id)`, unless removed; `login(client_id)`
gives the user name and password a test client with that client id presents (`slmops-fleet...`: the fleet,
`slmops-agent-<id>`: device <id>, anything else: anonymous)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from fleet.acl import Principal
from protocol.errors import TopicError
from protocol.topics import check_device_id
from slmops.story import free_port, wait_port  # noqa: F401  (re-exported for the tests)

FLEET_USER = "fleet"
FLEET_PASSWORD = secrets.token_urlsafe(32)
_DEVICE_KEY = secrets.token_bytes(32)


def device_password(device_id: str) -> str:
    return hmac.new(_DEVICE_KEY, device_id.encode(), hashlib.sha256).hexdigest()


def login(client_id: str) -> tuple[str | None, str | None]:
    """The credentials a test client with this client id presents."""
    if client_id == "slmops-fleet" or client_id.startswith("slmops-fleet-"):
        return FLEET_USER, FLEET_PASSWORD
    if client_id.startswith("slmops-agent-"):
        device = client_id.removeprefix("slmops-agent-")
        return device, device_password(device)
    return None, None


class TestAccounts:
    """The fleet and every device with its derived password, less the devices removed (revoked)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self) -> None:
        self.removed: set[str] = set()

    def authenticate(self, username: str | None, password: str | None) -> Principal | None:
        if username is None or password is None:
            return None
        if username == FLEET_USER:
            return Principal("fleet") if hmac.compare_digest(password, FLEET_PASSWORD) else None
        try:
            check_device_id(username)
        except TopicError:
            return None
        if username in self.removed or not hmac.compare_digest(password, device_password(username)):
            return None
        return Principal("device", username)

    def add_device(self, device_id: str, password: str) -> None:
        self.removed.discard(device_id)

    def remove_device(self, device_id: str) -> None:
        self.removed.add(device_id)


def embedded_broker(port: int | None = None):  # -> fleet.broker.EmbeddedBroker (imported lazily: amqtt is heavy)
    """An embedded broker on a free loopback port that admits `TestAccounts` (not started)."""
    from fleet.broker import EmbeddedBroker

    return EmbeddedBroker("127.0.0.1", port or free_port(), authenticator=TestAccounts())

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@contextlib.contextmanager
def mosquitto(tmp: Path) -> Iterator[int]:
    """A real mosquitto 2 on a free loopback port (MQTT 3.1.1 and 5), stopped afterwards."""
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
