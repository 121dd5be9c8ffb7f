"""The agent's update lifecycle against real parts: an amqtt broker, real signed bundles of the tiny int4 model
served over HTTP, real onnxruntime-genai health checks and the local API. Each bad bundle must be refused with
its reason while the device keeps serving (and answering with) the model it had."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import queue
import tarfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.service import Agent
from fleet.bundles import build_bundle
from protocol import topics
from protocol.messages import BundleRef, DeployCommand, StatusReport, UpdateState, encode
from protocol.manifest import Manifest
from protocol.trust import generate_keypair, sign_envelope
from slmops.story import damaged_copy
from tests.net import FLEET_PASSWORD, device_password, embedded_broker
from tests.trustkit import TrustKit

pytestmark = pytest.mark.integration
NOW = datetime.now(timezone.utc)
U = UpdateState


class Rig:
    """One agent, one broker, one HTTP folder of bundles, and a publisher playing the fleet."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp, self.model = tmp, model
        self.kit, self.other = TrustKit(), generate_keypair()
        self.kit.write_root(tmp / "root.json")
        self.www = tmp / "www" / "api" / "v1" / "bundles"  # served like the fleet's bundle paths
        self.www.mkdir(parents=True)
        self.broker = embedded_broker().start()
        handler = functools.partial(QuietHandler, directory=str(tmp / "www"))
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.reports: queue.Queue[StatusReport] = queue.Queue()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="slmops-fleet-test")
        self.pub.username_pw_set("fleet", FLEET_PASSWORD)
        self.pub.connect("127.0.0.1", self.broker.port)
        self.pub.loop_start()
        self.agent: Agent | None = None
        self.n = 0

    def start_agent(self) -> Agent:
        cfg = AgentConfig(
            device_id="dev-1",
            data_dir=self.tmp / "agent",
            broker_url=self.broker.url,
            broker_username="dev-1",
            broker_password=device_password("dev-1"),
            trust_root=self.tmp / "root.json",
            bundle_origins=(self.origin,),
            api_port=0,
            telemetry_interval_s=3600,
        )
        self.agent = Agent(cfg, on_report=self.reports.put)
        self.agent.start()
        assert self.agent.link.wait_connected(10), "agent did not subscribe to its command topic"
        return self.agent

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def bundle(self, version: int, *, model: Path | None = None, signer=None, name: str | None = None, **kw) -> Path:
        out = self.www / (name or f"triage-{version}.bundle")
        build_bundle(model or self.model, out, name="triage", version=version,
                     signers=[signer or self.kit.bundle_keys[0]], now=NOW, **kw)
        return out

    def publish_roots(self) -> None:
        """Serve every root of the kit like the fleet's GET /api/v1/trust/root/{n}.json."""
        folder = self.tmp / "www" / "api" / "v1" / "trust" / "root"
        folder.mkdir(parents=True, exist_ok=True)
        for n, data in self.kit.roots.items():
            (folder / f"{n}.json").write_bytes(data)

    def deploy(self, path: Path, version: int, *, announce: bytes | None = None, timeout: float = 120) -> list[StatusReport]:
        """Publish a deploy command for a bundle file (announcing the digest and size of `announce`, by default
        the file's own bytes) and collect reports until the terminal one."""
        self.n += 1
        data = announce if announce is not None else path.read_bytes()
        ref = BundleRef(
            name="triage",
            version=version,
            url=f"{self.origin}/api/v1/bundles/{path.name}",
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        cmd = self.kit.sign(DeployCommand(deployment_id=f"dep-{self.n}", device_id="dev-1", bundle=ref, seq=self.n,
                                          sent_at=NOW))
        return self.send(cmd, timeout=timeout)

    def send(self, cmd: DeployCommand, *, timeout: float = 120) -> list[StatusReport]:
        """Publish a command and collect its reports until the terminal one."""
        self.pub.publish(str(topics.cmd("dev-1")), encode(cmd), qos=1).wait_for_publish(5)
        got: list[StatusReport] = []
        while True:
            r = self.reports.get(timeout=timeout)
            if r.deployment_id != cmd.deployment_id:
                continue
            got.append(r)
            if r.state.terminal:
                return got

    def ask(self) -> dict:
        assert self.agent is not None
        r = httpx.post(
            f"{self.agent.api_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "gw-3 battery=4% status=LOW"}], "max_tokens": 24},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        if self.agent:
            self.agent.stop()
        self.pub.loop_stop()
        self.pub.disconnect()
        self.http.shutdown()
        self.broker.stop()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def rig(tmp_path_factory, tiny_int4):
    r = Rig(tmp_path_factory.mktemp("rig"), Path(tiny_int4))
    r.start_agent()
    first = r.deploy(r.bundle(2), 2)
    assert [x.state for x in first] == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.INSTALLING, U.HEALTH_CHECK, U.ACTIVE]
    yield r
    r.close()


def states(reports: list[StatusReport]) -> list[UpdateState]:
    return [x.state for x in reports]


def assert_still_serving(rig: Rig, version: int) -> None:
    assert rig.agent.store.active().version == version
    answer = rig.ask()
    assert answer["model"] == f"triage:v{version}"
    assert answer["choices"][0]["message"]["content"].split(":")[0] in ("ok", "warning", "fault")


def rewrite_bundle(src: Path, dest: Path, *, envelope=None, member=None, mutate=None) -> Path:
    """Copy a bundle tar, replacing the envelope or changing one byte of one member."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == "manifest.json" and envelope:
                data = envelope(data)
            if m.name == member:
                data = mutate(data)
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return dest


def test_first_install_serves_the_model(rig):
    assert_still_serving(rig, 2)
    assert (rig.agent.store.version_dir(rig.agent.store.active()) / "genai_config.json").exists()


def test_changed_byte_in_a_model_file_is_refused(rig):
    def flip(data: bytes) -> bytes:
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]

    bad = rewrite_bundle(rig.bundle(3, name="src3.bundle"), rig.www / "flip.bundle", member="model/model.onnx", mutate=flip)
    reports = rig.deploy(bad, 3)
    assert states(reports)[-1] is U.REJECTED
    assert reports[-1].error_code == "hash_mismatch" and "model.onnx" in reports[-1].detail
    assert reports[-1].active_version == 2
    assert not rig.agent.store.version_dir(type(rig.agent.store.active())("triage", 3)).exists()
    assert list(rig.agent.store.staging_root.iterdir()) == []
    assert_still_serving(rig, 2)


def test_changed_manifest_field_is_refused(rig):
    def bump(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["signed"]["health"]["timeout_s"] = 999.0
        return json.dumps(doc).encode()

    bad = rewrite_bundle(rig.bundle(3, name="src3b.bundle"), rig.www / "field.bundle", envelope=bump)
    reports = rig.deploy(bad, 3)
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED]
    assert reports[-1].error_code == "bad_signature" and "changed after signing" in reports[-1].detail
    assert_still_serving(rig, 2)


def test_signature_by_another_key_is_refused(rig):
    reports = rig.deploy(rig.bundle(3, signer=rig.other, name="other.bundle"), 3)
    assert states(reports)[-1] is U.REJECTED
    assert reports[-1].error_code == "bad_signature" and "untrusted key" in reports[-1].detail
    assert_still_serving(rig, 2)


def test_download_that_does_not_match_the_command_is_refused(rig):
    good = rig.bundle(3, name="good3.bundle")
    reports = rig.deploy(good, 3)
    assert states(reports)[-1] is U.ACTIVE
    # the fleet announced one digest, the server hands out other bytes of the same length
    data = rig.bundle(4, name="b4.bundle").read_bytes()
    (rig.www / "swap.bundle").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    reports = rig.deploy(rig.www / "swap.bundle", 4, announce=data)
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.REJECTED]
    assert reports[-1].error_code == "hash_mismatch"
    assert_still_serving(rig, 3)


def test_malformed_and_misaddressed_commands_are_dropped(rig):
    rig.pub.publish(str(topics.cmd("dev-1")), b"{not json", qos=1).wait_for_publish(5)
    other = DeployCommand(deployment_id="x", device_id="dev-2", sent_at=NOW,
                          bundle=BundleRef(name="triage", version=77, url="http://127.0.0.1:1/x", sha256="0" * 64, size=1))
    rig.pub.publish(str(topics.cmd("dev-1")), encode(other), qos=1).wait_for_publish(5)
    with pytest.raises(queue.Empty):
        rig.reports.get(timeout=1.5)
    assert rig.ask()["choices"][0]["message"]["content"]


def resigned(src: Path, dest: Path, key, **target) -> Path:
    """A copy of a bundle whose manifest's target is changed, then signed again by a trusted key."""
    def edit(data: bytes) -> bytes:
        signed = json.loads(data)["signed"]
        signed["target"].update(target)
        return sign_envelope(Manifest.from_signed(signed), [key])

    return rewrite_bundle(src, dest, envelope=edit)


REFUSED_BEFORE_INSTALL = [
    # (id, make the bundle (rig, active version) -> (file, version), error code)
    ("equal_version_other_content", lambda r, v: (r.bundle(v, name="same-v.bundle", description="other content"), v),
     "version_reused"),  # the active version's files are damaged (below), so the device fetches it again to repair
    ("fp16_on_a_cpu_device", lambda r, v: (r.bundle(v + 1, name="fp16.bundle", precision="fp16"), v + 1), "incompatible"),
    ("cuda_execution_provider", lambda r, v: (resigned(r.bundle(v + 1, name="src-cuda.bundle"), r.www / "cuda.bundle",
                                                       r.kit.bundle_keys[0], execution_provider="cuda"), v + 1),
     "incompatible"),
]


@pytest.mark.parametrize(("make", "code"), [pytest.param(m, c, id=i) for i, m, c in REFUSED_BEFORE_INSTALL])
def test_refused_before_install(rig, make, code):
    active = rig.agent.store.active()
    manifest_before = rig.agent.store.trusted_manifest(active)
    path, version = make(rig, active.version)
    config = rig.agent.store.version_dir(active) / "genai_config.json"
    original = config.read_bytes()
    if version == active.version:
        config.write_bytes(original + b" ")  # a size the verified manifest does not say: repair it
    try:
        reports = rig.deploy(path, version)
    finally:
        config.write_bytes(original)
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED]
    assert reports[-1].error_code == code
    assert rig.agent.store.trusted_manifest(active) == manifest_before and rig.agent.store.floor("triage") == active.version
    assert list(rig.agent.store.staging_root.iterdir()) == []
    assert_still_serving(rig, active.version)


def test_equal_version_with_other_content_is_refused_while_it_serves(rig):
    """The active version, its files intact, named again with another bundle file: not "already active" (the device
    does not have that content) but fetched, verified and refused as a reused version; nothing changes."""
    active = rig.agent.store.active()
    manifest_before = rig.agent.store.trusted_manifest(active)
    digest_before = rig.agent.store.bundle_digest(active)
    assert digest_before is not None
    reports = rig.deploy(rig.bundle(active.version, name="same-v-live.bundle", description="other content"), active.version)
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED]
    assert reports[-1].error_code == "version_reused"
    assert rig.agent.store.trusted_manifest(active) == manifest_before
    assert rig.agent.store.bundle_digest(active) == digest_before
    assert list(rig.agent.store.staging_root.iterdir()) == []
    assert_still_serving(rig, active.version)


def test_unsigned_and_forged_commands_over_mqtt_are_not_acted_on(rig):
    active = rig.agent.store.active().version
    path = rig.bundle(active + 1, name="forged.bundle")
    data = path.read_bytes()
    ref = BundleRef(name="triage", version=active + 1, url=f"{rig.origin}/api/v1/bundles/{path.name}",
                    sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    for cmd in (DeployCommand(deployment_id="forged-1", device_id="dev-1", bundle=ref, seq=10**9, sent_at=NOW),
                rig.kit.sign(DeployCommand(deployment_id="forged-2", device_id="dev-1", bundle=ref, seq=10**9,
                                           sent_at=NOW), key=rig.other)):
        rig.pub.publish(str(topics.cmd("dev-1")), encode(cmd), qos=1).wait_for_publish(5)
    with pytest.raises(queue.Empty):
        rig.reports.get(timeout=1.5)
    sample = rig.agent.metrics.registry.get_sample_value
    assert sample("slmops_agent_commands_dropped_total", {"reason": "forged"}) == 2
    assert_still_serving(rig, active)


def test_bundle_keys_rotated_by_the_fleet_work_without_a_restart(rig):
    """The fleet rotates its bundle key (old one revoked) and publishes root v2; the next command names root v2, so
    the device fetches it, and a bundle signed by the new key installs while one by the old key is refused."""
    old = rig.kit.bundle_keys[0]
    rig.kit.rotate(bundles=True, revoke=True)
    rig.publish_roots()
    active = rig.agent.store.active().version
    reports = rig.deploy(rig.bundle(active + 1, name="new-key.bundle"), active + 1)
    assert states(reports)[-1] is U.ACTIVE and rig.agent.gate.root.version == 2
    reports = rig.deploy(rig.bundle(active + 2, name="old-key.bundle", signer=old), active + 2)
    assert states(reports)[-1] is U.REJECTED and reports[-1].error_code == "bad_signature"
    assert_still_serving(rig, active + 1)


def test_older_version_is_refused_as_a_rollback(rig):
    reports = rig.deploy(rig.bundle(1, name="old.bundle"), 1)
    assert states(reports)[-1] is U.REJECTED and reports[-1].error_code == "bad_version"
    assert rig.agent.store.active().version >= 2


def test_failed_health_check_rolls_back_and_keeps_serving(rig, tmp_path):
    current = rig.agent.store.active().version
    broken = damaged_copy(rig.model, tmp_path / "broken")
    reports = rig.deploy(rig.bundle(9, model=broken, name="broken.bundle"), 9)
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.INSTALLING, U.HEALTH_CHECK, U.ROLLED_BACK]
    assert reports[-1].error_code == "health_check" and "smoke prompt" in reports[-1].detail
    assert reports[-1].active_version == current
    assert not (rig.agent.store.versions_root / "triage" / "9").exists()
    assert_still_serving(rig, current)


def test_redelivered_command_is_not_run_twice(rig):
    before = rig.agent.store.active().version
    assert rig.agent.updater.handle(
        DeployCommand(deployment_id="dep-1", device_id="dev-1", sent_at=NOW,
                      bundle=BundleRef(name="triage", version=50, url="http://127.0.0.1:1/x", sha256="0" * 64, size=1))
    ) is None
    assert rig.agent.store.active().version == before


def test_requests_in_a_loop_across_a_model_update_all_succeed(rig):
    """Hot swap: requests running during the switch finish on the old model, later ones get the new one."""
    before = rig.agent.store.active().version
    bundle = rig.bundle(before + 1, name=f"loop{before + 1}.bundle")
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=rig.agent.api_url, timeout=30) as client:
            while not stop.is_set():
                stream = len(served) % 2 == 1
                body = {"messages": [{"role": "user", "content": "gw-3 battery=4% status=LOW"}], "max_tokens": 24,
                        "stream": stream}
                try:
                    r = client.post("/v1/chat/completions", json=body)
                    if r.status_code != 200 or (stream and not r.text.rstrip().endswith("data: [DONE]")):
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    elif stream:
                        served.append(json.loads(r.text.split("\n\n")[0][6:])["model"])
                    else:
                        served.append(r.json()["model"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(served) < 4 and not failures and time.monotonic() < deadline:  # the loop runs before the update
            time.sleep(0.02)
        reports = rig.deploy(bundle, before + 1)
        n = len(served)
        while len(served) < n + 10 and not failures:  # keep asking a little after the switch
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert states(reports)[-1] is U.ACTIVE
    assert failures == []
    assert f"triage:v{before}" in served and served[-1] == f"triage:v{before + 1}"
    assert len(served) >= 10
