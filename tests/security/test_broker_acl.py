"""Identity on the broker, one attack per row, against the embedded broker AND a real mosquitto set up with the
files in deploy/mosquitto/ (dynamic security, and password file + ACL patterns).

Each broker runs once per module; every test enrols its own devices A and B (fresh ids), connects B and a fleet
client the way the real ones connect (`mqttlink.make_client`), lets device A attack, and then checks the trusted
state: B is still connected and still gets the fleet's commands, and nothing A sent in B's name reached anyone.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fleet.broker import EmbeddedBroker, StaticAccounts
from mqttlink import ClientOptions, make_client
from protocol import topics
from tests.net import MOSQUITTO, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
DYNSEC_SO = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
CTRL, PASSWD = shutil.which("mosquitto_ctrl"), shutil.which("mosquitto_passwd")
FLEET_FILTERS = [topics.Topic.wildcard(ch) for ch in (topics.Channel.STATUS, topics.Channel.TELEMETRY, topics.Channel.PRESENCE)]
REFUSED = {"Bad user name or password", "Not authorized"}
WAIT_S = 5.0
_ids = itertools.count(1)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def secret() -> str:
    import secrets

    return secrets.token_urlsafe(32)


# ---- the brokers -------------------------------------------------------------------------------------------------


class Rig:
    """One broker; `enrol` makes a device account, `revoke` removes it (and ends its live session if it can)."""

    kind: str
    port: int
    fleet_login: tuple[str, str]
    drops_live_sessions = True

    def enrol(self, device_id: str) -> str: ...

    def revoke(self, device_id: str) -> None: ...

    def close(self) -> None: ...


class EmbeddedRig(Rig):
    kind = "embedded"

    def __init__(self, tmp: Path) -> None:
        password = secret()
        self.accounts = StaticAccounts(password)
        self.broker = EmbeddedBroker("127.0.0.1", free_port(), authenticator=self.accounts).start()
        self.port, self.fleet_login = self.broker.port, ("fleet", password)

    def enrol(self, device_id: str) -> str:
        password = secret()
        self.broker.accounts.add_device(device_id, password)
        return password

    def revoke(self, device_id: str) -> None:
        self.broker.accounts.remove_device(device_id)

    def close(self) -> None:
        self.broker.stop()


def mosquitto_conf(src: Path, port: int, replace: dict[str, str]) -> str:
    """A deploy/ configuration on a loopback test port, with its paths pointed into the test's folder."""
    text = src.read_text().replace("listener 1883", f"listener {port} 127.0.0.1").replace("persistence true", "persistence false")
    for old, new in replace.items():
        assert old in text, f"{src.name} no longer says {old!r}"
        text = text.replace(old, new)
    return text + ("user root\n" if os.geteuid() == 0 else "")  # as root mosquitto drops to a user that cannot read tmp


class MosquittoRig(Rig):
    def __init__(self, tmp: Path, conf: str) -> None:
        (tmp / "mosquitto.conf").write_text(conf)
        self.log = (tmp / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp / "mosquitto.conf")], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


class DynsecRig(MosquittoRig):
    kind = "mosquitto-dynsec"

    def __init__(self, tmp: Path) -> None:
        from fleet.dynsec import DynsecAccounts

        self.port = free_port()
        admin, fleet = secret(), secret()
        env = {**os.environ, "SLMOPS_DYNSEC_ADMIN_PASSWORD": admin, "SLMOPS_FLEET_BROKER_PASSWORD": fleet}
        script = str(DEPLOY / "dynsec-init.sh")
        subprocess.run(["sh", script, "file", str(tmp / "dynsec.json")], env=env, check=True, capture_output=True)
        conf = mosquitto_conf(DEPLOY / "dynsec.conf", self.port, {
            "/var/lib/mosquitto/dynamic-security.json": str(tmp / "dynsec.json"),
            "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so": str(DYNSEC_SO),
        })
        super().__init__(tmp, conf)
        subprocess.run(["sh", script, "roles", "127.0.0.1", str(self.port)], env=env, check=True, capture_output=True)
        self.fleet_login = ("fleet", fleet)
        self.accounts = DynsecAccounts(ClientOptions(f"mqtt://127.0.0.1:{self.port}", "slmops-fleet-dynsec",
                                                     username="admin", password=admin))

    def enrol(self, device_id: str) -> str:
        password = secret()
        self.accounts.add_device(device_id, password)
        return password

    def revoke(self, device_id: str) -> None:
        self.accounts.remove_device(device_id)

    def close(self) -> None:
        self.accounts.close()
        super().close()


class PasswdRig(MosquittoRig):
    kind = "mosquitto-passwd"
    drops_live_sessions = False  # a reloaded password file refuses new connections only (see passwd-acl.conf)

    def __init__(self, tmp: Path) -> None:
        self.port, self.passwd = free_port(), tmp / "slmops.passwd"
        fleet = secret()
        subprocess.run([PASSWD, "-c", "-b", str(self.passwd), "fleet", fleet], check=True, capture_output=True)
        shutil.copy(DEPLOY / "slmops.acl", tmp / "slmops.acl")
        conf = mosquitto_conf(DEPLOY / "passwd-acl.conf", self.port, {
            "/etc/mosquitto/slmops.passwd": str(self.passwd),
            "/etc/mosquitto/slmops.acl": str(tmp / "slmops.acl"),
        })
        super().__init__(tmp, conf)
        self.fleet_login = ("fleet", fleet)

    def _reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # mosquitto rereads the files between two network loops

    def enrol(self, device_id: str) -> str:
        password = secret()
        subprocess.run([PASSWD, "-b", str(self.passwd), device_id, password], check=True, capture_output=True)
        self._reload()
        return password

    def revoke(self, device_id: str) -> None:
        subprocess.run([PASSWD, "-D", str(self.passwd), device_id], check=True, capture_output=True)
        self._reload()


def _mosquitto_missing(*tools: str | None) -> str | None:
    if MOSQUITTO is None:
        return "mosquitto is not installed (apt-get install mosquitto)"
    if not all(tools):
        return "mosquitto_ctrl / mosquitto_passwd are not installed (apt-get install mosquitto-clients)"
    return None


KINDS = [
    pytest.param(EmbeddedRig, id="embedded"),
    pytest.param(DynsecRig, id="mosquitto-dynsec", marks=pytest.mark.skipif(
        bool(_mosquitto_missing(CTRL)) or not DYNSEC_SO.exists(),
        reason=_mosquitto_missing(CTRL) or "mosquitto's dynamic-security plugin is not installed")),
    pytest.param(PasswdRig, id="mosquitto-passwd", marks=pytest.mark.skipif(
        bool(_mosquitto_missing(PASSWD)), reason=_mosquitto_missing(PASSWD) or "")),
]


@pytest.fixture(scope="module", params=KINDS)
def rig(request, tmp_path_factory) -> Iterator[Rig]:
    r = request.param(tmp_path_factory.mktemp(request.param.__name__))
    yield r
    r.close()


# ---- clients -----------------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A paho client from `mqttlink.make_client`, recording what the broker answered and what it delivered."""

    client: mqtt.Client
    connack: list[str] = field(default_factory=list)
    subacks: list[list[str]] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, topic: str | None = None) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if topic is None or t == topic]

    def subscribe(self, topic_filter: str) -> list[str]:
        before = len(self.subacks)
        self.client.subscribe(topic_filter, qos=1)
        wait_for(lambda: len(self.subacks) > before, f"the SUBACK for {topic_filter}")
        return self.subacks[before]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Scene:
    rig: Rig
    a: str
    b: str
    a_login: tuple[str, str]
    fleet: Peer
    peer_b: Peer
    peers: list[Peer]

    def connect(self, client_id: str, username: str | None, password: str | None, *, will: tuple[str, bytes] | None = None,
                wait: bool = True) -> Peer:
        opts = ClientOptions(f"mqtt://127.0.0.1:{self.rig.port}", client_id, username=username, password=password,
                             reconnect_max_s=30)
        peer = Peer(make_client(opts))
        c = peer.client
        c.on_connect = lambda _c, _u, _f, rc, _p=None: peer.connack.append(str(rc))
        c.on_subscribe = lambda _c, _u, _m, rcs, _p=None: peer.subacks.append([str(r) for r in rcs])

        def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
            with peer.lock:
                peer.messages.append((m.topic, m.payload))

        c.on_message = on_message
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.connect("127.0.0.1", self.rig.port, 30)  # one try, no reconnect: each answer is recorded once
        c.loop_start()
        self.peers.append(peer)
        if wait:
            wait_for(lambda: peer.connack, f"the CONNACK for {client_id}")
        return peer

    def device(self, device_id: str, login: tuple[str, str]) -> Peer:
        return self.connect(f"slmops-agent-{device_id}", *login)

    def command_reaches_b(self, payload: bytes) -> None:
        """The fleet can still command B, and B (still connected) gets it."""
        self.fleet.publish(str(topics.cmd(self.b)), payload)
        wait_for(lambda: payload in self.peer_b.got(), "B to get the fleet's command")

    def report_from_a_reaches_fleet(self, a: Peer, payload: bytes) -> None:
        a.publish(str(topics.status(self.a)), payload)
        wait_for(lambda: payload in self.fleet.got(str(topics.status(self.a))), "A's own report at the fleet")


@pytest.fixture
def scene(rig: Rig) -> Iterator[Scene]:
    n = next(_ids)
    a, b = f"dev-a{n}", f"dev-b{n}"
    a_login, b_login = (a, rig.enrol(a)), (b, rig.enrol(b))
    s = Scene(rig, a, b, a_login, None, None, [])  # type: ignore[arg-type]
    s.fleet = s.connect(f"slmops-fleet-t{n}", *rig.fleet_login)
    assert s.fleet.connack == ["Success"], s.fleet.connack
    assert all(r.startswith("Granted") for f in FLEET_FILTERS for r in s.fleet.subscribe(f))
    s.peer_b = s.device(b, b_login)
    assert s.peer_b.connack == ["Success"], s.peer_b.connack
    assert s.peer_b.subscribe(str(topics.cmd(b))) == ["Granted QoS 1"]
    try:
        yield s
    finally:
        for p in s.peers:
            p.close()


def b_untouched(s: Scene) -> None:
    """The trusted state after any attack: B connected, commands reach it, nothing in B's name reached anyone."""
    assert s.peer_b.client.is_connected(), "B was kicked off"
    s.command_reaches_b(b"real-command")
    assert s.peer_b.got() == [b"real-command"], "B got something the fleet never sent"
    fakes = [p for t, p in s.fleet.messages if f"/{s.b}/" in t]
    assert fakes == [], f"the fleet got reports in B's name: {fakes}"


# ---- the fleet and a device do their jobs --------------------------------------------------------------------------


def test_the_fleet_commands_a_device_and_reads_its_reports(scene: Scene) -> None:
    a = scene.device(scene.a, scene.a_login)
    assert a.connack == ["Success"]
    assert a.subscribe(str(topics.cmd(scene.a))) == ["Granted QoS 1"]
    scene.fleet.publish(str(topics.cmd(scene.a)), b"deploy")
    wait_for(lambda: a.got() == [b"deploy"], "A to get its command")
    for ch in (topics.Channel.STATUS, topics.Channel.TELEMETRY, topics.Channel.PRESENCE):
        a.publish(str(topics.Topic(scene.a, ch)), ch.value.encode())
    wait_for(lambda: len(scene.fleet.got()) == 3, "A's three reports at the fleet")
    assert sorted(scene.fleet.got()) == [b"presence", b"status", b"telemetry"]
    b_untouched(scene)


# ---- who may connect -----------------------------------------------------------------------------------------------


def _anonymous(s: Scene) -> Peer:
    return s.connect(f"slmops-agent-{s.a}", None, None)


def _wrong_password(s: Scene) -> Peer:
    return s.connect(f"slmops-agent-{s.a}", s.a, secret())


def _unknown_user(s: Scene) -> Peer:
    return s.connect("slmops-agent-nobody", "nobody", secret())


def _revoked(s: Scene) -> Peer:
    s.rig.revoke(s.a)
    return s.connect(f"slmops-agent-{s.a}", *s.a_login)


def _fleet_password_for_a_device(s: Scene) -> Peer:
    return s.connect(f"slmops-agent-{s.a}", s.a, s.rig.fleet_login[1])


def _anonymous_with_bs_client_id(s: Scene) -> Peer:
    return s.connect(f"slmops-agent-{s.b}", None, None)  # amqtt itself would drop B's session before asking


CONNECT_REFUSALS = [
    pytest.param(_anonymous, id="anonymous"),
    pytest.param(_anonymous_with_bs_client_id, id="anonymous_with_bs_client_id"),
    pytest.param(_wrong_password, id="wrong_password"),
    pytest.param(_unknown_user, id="unknown_user"),
    pytest.param(_revoked, id="revoked_device"),
    pytest.param(_fleet_password_for_a_device, id="another_accounts_password"),
]


@pytest.mark.parametrize("attack", CONNECT_REFUSALS)
def test_connect_is_refused(scene: Scene, attack: Callable[[Scene], Peer]) -> None:
    peer = attack(scene)
    assert peer.connack and peer.connack[0] in REFUSED, peer.connack
    assert not peer.client.is_connected()
    b_untouched(scene)


def test_a_cannot_take_over_bs_client_id(scene: Scene) -> None:
    """With B's client id A is refused (embedded, dynamic security: the account is bound to its client id) or
    gets its own user name as client id (password file: use_username_as_clientid): B stays on either way."""
    peer = scene.connect(f"slmops-agent-{scene.b}", *scene.a_login)
    if scene.rig.kind == "mosquitto-passwd":
        assert peer.connack == ["Success"]  # connected as A after all
        peer.subscribe(str(topics.cmd(scene.b)))  # granted by mosquitto 2.0's acl_file, but nothing is delivered
    else:
        assert peer.connack and peer.connack[0] in REFUSED, peer.connack
    time.sleep(0.3)  # a take-over, had there been one, ends B's connection at once
    b_untouched(scene)
    time.sleep(0.2)
    assert peer.got() == [], "A read B's command"


def test_a_last_will_in_bs_name_is_not_delivered(scene: Scene) -> None:
    will = (str(topics.presence(scene.b)), b"b-is-offline")
    peer = scene.connect(f"slmops-agent-{scene.a}", *scene.a_login, will=will)
    if peer.connack == ["Success"]:  # mosquitto admits it and checks the will when it is sent
        peer.client.socket().close()  # die without DISCONNECT: the broker sends the will now
        time.sleep(0.5)
    else:
        assert peer.connack[0] in REFUSED  # the embedded broker refuses such a CONNECT at once
    b_untouched(scene)


# ---- what a connected device may do --------------------------------------------------------------------------------


def _publish_as_b(channel: topics.Channel) -> Callable[[Scene, Peer], None]:
    def attack(s: Scene, a: Peer) -> None:
        a.publish(str(topics.Topic(s.b, channel)), b"fake-" + channel.value.encode())
        s.report_from_a_reaches_fleet(a, b"a-after")  # sent after the fake: had the fake got through, it is there

    return attack


def _command_b(s: Scene, a: Peer) -> None:
    a.publish(str(topics.cmd(s.b)), b"fake-command")


def _subscribe(which: Callable[[Scene], str]) -> Callable[[Scene, Peer], None]:
    def attack(s: Scene, a: Peer) -> None:
        codes = a.subscribe(which(s))
        if s.rig.kind != "mosquitto-passwd":  # mosquitto 2.0's acl_file grants it and then delivers nothing
            assert codes and codes[0] in REFUSED | {"Unspecified error"}, codes
        s.fleet.publish(str(topics.cmd(s.b)), b"for-b-only")
        wait_for(lambda: b"for-b-only" in s.peer_b.got(), "B's command")
        s.peer_b.messages.clear()
        a.publish(str(topics.status(s.a)), b"a-report")  # ...and another device's reports
        wait_for(lambda: b"a-report" in s.fleet.got(), "A's report at the fleet")
        time.sleep(0.2)
        assert a.got() == [], f"A read what is not its own: {a.got()}"

    return attack


DEVICE_REFUSALS = [
    pytest.param(_publish_as_b(topics.Channel.STATUS), id="publish_b_status"),
    pytest.param(_publish_as_b(topics.Channel.TELEMETRY), id="publish_b_telemetry"),
    pytest.param(_publish_as_b(topics.Channel.PRESENCE), id="publish_b_presence"),
    pytest.param(_command_b, id="publish_b_cmd"),
    pytest.param(_subscribe(lambda s: str(topics.cmd(s.b))), id="subscribe_b_cmd"),
    pytest.param(_subscribe(lambda s: topics.Topic.wildcard(topics.Channel.CMD)), id="subscribe_cmd_wildcard"),
    pytest.param(_subscribe(lambda s: topics.Topic.wildcard(topics.Channel.STATUS)), id="subscribe_status_wildcard"),
    pytest.param(_subscribe(lambda s: "#"), id="subscribe_everything"),
]


@pytest.mark.parametrize("attack", DEVICE_REFUSALS)
def test_a_device_acts_only_in_its_own_name(scene: Scene, attack: Callable[[Scene, Peer], None]) -> None:
    a = scene.device(scene.a, scene.a_login)
    assert a.connack == ["Success"]
    attack(scene, a)
    b_untouched(scene)
    assert a.client.is_connected() or scene.rig.kind != "embedded"  # the embedded broker drops, never disconnects


# ---- revocation of a connected device ------------------------------------------------------------------------------


def test_revoking_a_connected_device_drops_it(scene: Scene) -> None:
    if not scene.rig.drops_live_sessions:
        pytest.skip("a reloaded mosquitto password file refuses new connections only (covered by revoked_device)")
    a = scene.device(scene.a, scene.a_login)
    assert a.subscribe(str(topics.cmd(scene.a))) == ["Granted QoS 1"]
    scene.rig.revoke(scene.a)
    wait_for(lambda: not a.client.is_connected(), "the revoked device to be disconnected")
    scene.fleet.publish(str(topics.cmd(scene.a)), b"after-revocation")
    again = scene.connect(f"slmops-agent-{scene.a}", *scene.a_login)
    assert again.connack and again.connack[0] in REFUSED, again.connack
    time.sleep(0.2)
    assert a.got() == [] and again.got() == []
    b_untouched(scene)
