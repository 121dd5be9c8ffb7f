"""The end-to-end story, shared by `slmops demo` and the integration tests.

Parts, each started on free loopback ports and stopped by its owner:
- `FleetServer`: the fleet's FastAPI app under uvicorn in this process, with its embedded broker (or an external
  broker URL), a SQLite database in a work folder and a trust folder (`slmops keys init`) that signs its commands;
  authentication is on, with the admin token given or, in demo mode, generated (`FleetServer.admin_token`);
- `AgentProcess`: one `slmops agent run` child process per device, each with its own data folder and local API,
  provisioned with the fleet's root.json and its URL as the only bundle origin, and the identity it enrolled with
  (written to its data folder) or a `--fleet-token`;
- `FleetClient`: the fleet's HTTP API as an operator uses it, with a bearer token (register, enrol, upload,
  deploy, wait, inspect).
`rollout(...)` deploys a bundle to a group and waits for every device's terminal report; `ask(...)` puts a
question to a device's local API. `damaged_copy(...)` makes the deliberately broken model of the story.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TERMINAL = {"active", "rejected", "rolled_back", "failed"}
QUESTION = "2026-11-24T08:15:02Z pump-17 temp=97.1C vibration=1.4g status=OVERHEAT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Return once something listens on 127.0.0.1:`port`; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def damaged_copy(src: Path, dest: Path, *, seed: int = 0) -> Path:
    """Copy an exported model folder and overwrite its weights with random bytes of the same size.

    The result still loads (every file and the graph are well formed) but answers nonsense: the kind of model a
    broken quantization or a bad training run produces, which only a health check that asks it something catches.
    """
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    weights = sorted(dest.glob("*.onnx.data")) or sorted(dest.glob("*.onnx"))
    rng = random.Random(seed)
    for path in weights:
        size = path.stat().st_size
        if path.suffix == ".onnx":  # weights inside the graph file: keep the header, scramble the tail
            data = bytearray(path.read_bytes())
            start = size // 4
            data[start:] = rng.randbytes(size - start)
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(rng.randbytes(size))
    return dest


class FleetServer:
    """The fleet service in this process: HTTP API, MQTT ingest, embedded broker (unless one is given).

    `tls_cert_file` + `tls_key_file` serve HTTPS (`url` is then https), `tls_client_ca_file` asks every client for a
    certificate from that CA, `tls_crl_file` refuses the ones it revokes (see `fleet.settings.Settings`)."""

    def __init__(
        self,
        workdir: Path,
        *,
        broker_url: str | None = None,
        trust_dir: Path | None = None,
        trusted_keys: tuple[Path, ...] = (),
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        tls_client_ca_file: Path | None = None,
        tls_crl_file: Path | None = None,
        admin_token: str | None = None,
        broker_password: str | None = None,
        broker_ca_file: Path | None = None,
        broker_cert_file: Path | None = None,
        broker_key_file: Path | None = None,
        broker_admin_username: str | None = None,
        broker_admin_password: str | None = None,
        embedded_broker_tls_cert_file: Path | None = None,
        embedded_broker_tls_key_file: Path | None = None,
        public_broker_url: str | None = None,
    ) -> None:
        """Without `admin_token` the fleet runs in demo mode: its secrets are generated (and written 0600 to
        `<workdir>/demo-secrets.json`); with one, `broker_password` is required too, as for `slmops fleet serve`.
        `broker_admin_username`/`_password` enrol and revoke devices in mosquitto's dynamic security (an external
        `broker_url`); `embedded_broker_tls_*` put the embedded broker on TLS (with `broker_ca_file`, the CA the
        fleet's own client trusts it by); the other `broker_*` are the fleet's own MQTT client's TLS files."""
        from fleet.settings import Settings

        self.port = free_port()
        given = {
            "admin_token": admin_token, "broker_password": broker_password, "broker_ca_file": broker_ca_file,
            "broker_cert_file": broker_cert_file, "broker_key_file": broker_key_file,
            "broker_admin_username": broker_admin_username, "broker_admin_password": broker_admin_password,
            "embedded_broker_tls_cert_file": embedded_broker_tls_cert_file,
            "embedded_broker_tls_key_file": embedded_broker_tls_key_file, "public_broker_url": public_broker_url,
        }
        self.settings = Settings(
            data_dir=workdir,
            port=self.port,
            broker_url=broker_url,
            embedded_broker_port=free_port(),
            client_id=f"slmops-fleet-{os.getpid()}-{self.port}",
            trust_dir=trust_dir,
            trusted_keys=list(trusted_keys),
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_client_ca_file=tls_client_ca_file,
            tls_crl_file=tls_crl_file,
            demo=admin_token is None,
            **{k: v for k, v in given.items() if v is not None},
        )
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.settings.public_url

    @property
    def broker_url(self) -> str:
        return self.settings.effective_broker_url

    @property
    def admin_token(self) -> str:
        return self.settings.admin_token.get_secret_value()

    def start(self, timeout: float = 30.0) -> "FleetServer":
        import uvicorn

        from fleet.api.app import create_app
        from fleet.tls import uvicorn_config

        config = uvicorn_config(create_app(self.settings), self.settings, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="slmops-fleet", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the fleet did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


@dataclass
class AgentProcess:
    """One device: `slmops agent run` in a child process, provisioned with the fleet's root.json."""

    device_id: str
    data_dir: Path
    broker_url: str
    trust_root: Path
    bundle_origin: str
    log_path: Path
    api_port: int = field(default_factory=free_port)
    fleet_token: str | None = field(default=None, repr=False)  # passed as --fleet-token
    identity: dict | None = field(default=None, repr=False)  # an enrolment answer, saved as state/identity.json
    broker_ca: Path | None = None  # --broker-ca: the CA of an mqtts:// broker's certificate
    fleet_ca: Path | None = None  # --fleet-ca: the CA of an https fleet's certificate
    fleet_cert: Path | None = None  # --fleet-cert / --fleet-key: this device's client certificate (mutual TLS)
    fleet_key: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> "AgentProcess":
        cmd = [
            sys.executable, "-m", "slmops.cli", "agent", "run",
            "--device-id", self.device_id,
            "--data-dir", str(self.data_dir),
            "--broker", self.broker_url,
            "--trust-root", str(self.trust_root),
            "--bundle-origin", self.bundle_origin,
            "--api-port", str(self.api_port),
            "--telemetry-interval", "2",
        ]
        if self.fleet_token:
            cmd += ["--fleet-token", self.fleet_token]
        for flag, path in (("--broker-ca", self.broker_ca), ("--fleet-ca", self.fleet_ca),
                           ("--fleet-cert", self.fleet_cert), ("--fleet-key", self.fleet_key)):
            if path is not None:
                cmd += [flag, str(path)]
        if self.identity is not None:
            from agent.enrol import Identity, save_identity

            save_identity(self.data_dir, Identity(**self.identity))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.device_id} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                httpx.get(f"{self.api_url}/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"agent {self.device_id} did not open its local API in {timeout:g}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FleetClient:
    """The fleet's HTTP API, as an operator's script uses it."""

    def __init__(self, url: str, token: str | None = None, *, verify: ssl.SSLContext | bool = True) -> None:
        """`verify`: how an https fleet is checked, e.g. `fleet.tls.client_context(ca, cert_file=, key_file=)`."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.http = httpx.Client(base_url=url, timeout=60, headers=headers, verify=verify)

    def _ok(self, r: httpx.Response) -> dict | list:
        if r.status_code >= 400:
            raise RuntimeError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text}")
        return r.json()

    def register(self, device_id: str, groups: list[str]) -> dict:
        return self._ok(self.http.post("/api/v1/devices", json={"id": device_id, "groups": groups}))

    def enrol(self, device_id: str, groups: list[str]) -> dict:
        """Make a one-time enrolment token pinned to the device and trade it, as the device would; returns the
        identity (device id, broker username and password, device API token, URLs)."""
        made = self._ok(self.http.post("/api/v1/enrolment-tokens", json={"groups": groups, "device_id": device_id}))
        body = {"token": made["token"], "device_id": device_id}
        return self._ok(self.http.post("/api/v1/enrol", json=body, headers={"Authorization": ""}))

    def upload(self, bundle: Path) -> dict:
        with bundle.open("rb") as f:
            return self._ok(self.http.post("/api/v1/bundles", content=f, headers={"content-type": "application/octet-stream"}))

    def deploy(self, name: str, version: int, *, group: str | None = None, device_id: str | None = None) -> dict:
        body = {"bundle": name, "version": version, "group": group, "device_id": device_id}
        return self._ok(self.http.post("/api/v1/deployments", json={k: v for k, v in body.items() if v is not None}))

    def deployment(self, deployment_id: str) -> dict:
        return self._ok(self.http.get(f"/api/v1/deployments/{deployment_id}"))

    def device(self, device_id: str) -> dict:
        return self._ok(self.http.get(f"/api/v1/devices/{device_id}"))

    def devices(self) -> list:
        return self._ok(self.http.get("/api/v1/devices"))

    def revoke(self, device_id: str) -> dict:
        return self._ok(self.http.post(f"/api/v1/devices/{device_id}/revoke"))

    def wait_online(self, device_ids: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {d["id"] for d in self.devices() if d.get("online")}
            if set(device_ids) <= online:
                return
            time.sleep(0.2)
        raise TimeoutError(f"devices not online after {timeout:g}s: {sorted(set(device_ids) - online)}")

    def wait(self, deployment_id: str, timeout: float = 300.0) -> dict:
        """Poll a deployment until every target device reported a terminal state."""
        deadline = time.monotonic() + timeout
        while True:
            dep = self.deployment(deployment_id)
            if all(t["state"] in TERMINAL for t in dep["targets"]):
                return dep
            if time.monotonic() > deadline:
                pending = [t["device_id"] for t in dep["targets"] if t["state"] not in TERMINAL]
                raise TimeoutError(f"deployment {deployment_id}: no final report from {pending} after {timeout:g}s")
            time.sleep(0.25)

    def close(self) -> None:
        self.http.close()


def rollout(client: FleetClient, name: str, version: int, group: str, timeout: float = 300.0) -> dict:
    dep = client.deploy(name, version, group=group)
    return client.wait(dep["id"], timeout=timeout)


ROLLOUT_FINAL = {"succeeded", "aborted", "cancelled", "superseded"}


def staged_rollout(client: FleetClient, body: dict, timeout: float = 300.0) -> tuple[dict, dict]:
    """Start a staged rollout (POST /api/v1/rollouts `body`) and wait until it has ended and every device it sent
    a command has answered; returns (rollout, its deployment with each target's state)."""
    r = client._ok(client.http.post("/api/v1/rollouts", json=body))
    deadline = time.monotonic() + timeout
    while True:
        r = client._ok(client.http.get(f"/api/v1/rollouts/{r['id']}"))
        dep = client.deployment(r["id"])
        settled = all(t["state"] in TERMINAL | {"cancelled"} for t in dep["targets"])
        if r["state"] in ROLLOUT_FINAL and settled:
            return r, dep
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {r['id']} still {r['state']} after {timeout:g}s: {r['reason']}")
        time.sleep(0.2)


def ask(api_url: str, question: str = QUESTION, max_tokens: int = 32) -> tuple[str, str]:
    """Ask a device's local OpenAI-compatible API; return (model id, answer)."""
    r = httpx.post(
        f"{api_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    r.raise_for_status()
    body = r.json()
    return body["model"], body["choices"][0]["message"]["content"]
