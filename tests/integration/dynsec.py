"""A real mosquitto 2 with per-device identity, set up the way deploy/README.md says, for the integration tests.

`DynsecMosquitto(tmp, tls=(ca, server_files) or None)` writes the plugin's file with `deploy/mosquitto/dynsec-init.sh
file`, starts mosquitto from `deploy/mosquitto/dynsec.conf` on a free loopback port (its `listener 1883` replaced by
that port; with `tls`, the listener speaks TLS only, with a server certificate from the project CA) and runs
`dynsec-init.sh roles` against it (over TLS with `SLMOPS_DYNSEC_CTRL_OPTS=--cafile`). `url` is the broker URL
(mqtt5:// or mqtt5s://); `admin_password` and `fleet_password` are the two accounts the script made. `get_client`
and `login` ask the broker itself (for assertions); `close()` stops it. `missing()` says why it cannot run here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

from fleet import pki
from mqttlink import ClientOptions, make_client
from tests.net import MOSQUITTO, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
DYNSEC_SO = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
CTRL = shutil.which("mosquitto_ctrl")


def missing() -> str | None:
    """Why a dynamic-security mosquitto cannot run on this machine, or None."""
    if MOSQUITTO is None:
        return "mosquitto is not installed (apt-get install mosquitto)"
    if CTRL is None:
        return "mosquitto_ctrl is not installed (apt-get install mosquitto-clients)"
    if not DYNSEC_SO.exists():
        return f"mosquitto's dynamic-security plugin is not at {DYNSEC_SO}"
    return None


class DynsecMosquitto:
    def __init__(self, tmp: Path, *, tls: tuple[Path, pki.IssuedFiles] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ca = tls[0] if tls else None
        self.admin_password, self.fleet_password = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        env = {**os.environ, "SLMOPS_DYNSEC_ADMIN_PASSWORD": self.admin_password,
               "SLMOPS_FLEET_BROKER_PASSWORD": self.fleet_password}
        if self.ca is not None:
            env["SLMOPS_DYNSEC_CTRL_OPTS"] = f"--cafile {self.ca}"
        script = str(DEPLOY / "dynsec-init.sh")
        subprocess.run(["sh", script, "file", str(tmp / "dynsec.json")], env=env, check=True, capture_output=True)
        listener = f"listener {self.port} 127.0.0.1\n"
        if tls is not None:
            listener += f"certfile {tls[1].cert_file}\nkeyfile {tls[1].key_file}\n"
        text = (DEPLOY / "dynsec.conf").read_text()
        for old, new in {
            "listener 1883\n": listener,
            "/var/lib/mosquitto/dynamic-security.json": str(tmp / "dynsec.json"),
            "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so": str(DYNSEC_SO),
            "persistence true": "persistence false",
        }.items():
            assert old in text, f"dynsec.conf no longer says {old!r}"
            text = text.replace(old, new)
        conf = tmp / "mosquitto.conf"
        conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))  # as root it drops to a user that cannot read tmp
        self.log = (tmp / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
            subprocess.run(["sh", script, "roles", "127.0.0.1", str(self.port)], env=env, check=True, capture_output=True)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"mqtt5{'s' if self.ca else ''}://127.0.0.1:{self.port}"

    def get_client(self, username: str) -> dict:
        """mosquitto's own answer to getClient (with "error" when it does not know the client), asked as the admin."""
        from fleet.dynsec import DynsecAccounts

        admin = DynsecAccounts(ClientOptions(self.url, f"slmops-test-admin-{secrets.token_hex(4)}", username="admin",
                                             password=self.admin_password, ca_file=self.ca))
        try:
            return admin.run([{"command": "getClient", "username": username}], may_be_missing={"getClient"})[0]
        finally:
            admin.close()

    def login(self, identity: dict) -> str:
        """Log in with an enrolled identity's broker credentials; the CONNACK's reason (or 'no CONNACK')."""
        opts = ClientOptions(self.url, f"slmops-agent-{identity['device_id']}", username=identity["broker_username"],
                             password=identity["broker_password"], ca_file=self.ca)
        got: list[str] = []
        done = threading.Event()
        client = make_client(opts)
        client.on_connect = lambda _c, _u, _f, reason, _p=None: (got.append(str(reason)), done.set())
        client.connect(opts.address.host, opts.address.port, 30)
        client.loop_start()
        try:
            done.wait(10)
        finally:
            client.disconnect()
            client.loop_stop()
        return got[0] if got else "no CONNACK"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()
