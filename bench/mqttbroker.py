"""mosquitto for the rollout benchmark and its tests, with the settings shipped in `deploy/mosquitto/`.

Workflow: `Mosquitto(workdir, accounts, fleet_password)` writes a password file (`hash_password`: the format
`mosquitto_passwd` writes in 2.0, PBKDF2-SHA512, 101 rounds, 12-byte salt, `$7$101$salt$hash`, so 10,000 device
accounts take seconds instead of one `$CONTROL` round trip each as dynamic security would), copies
`deploy/mosquitto/slmops.acl`, and takes `deploy/mosquitto/passwd-acl.conf` as it is except for the listener
(a free loopback port), the file paths, and persistence (off: every run starts clean); `start()` runs mosquitto and
waits for the port; `stop()` ends it. `missing()` says why mosquitto cannot run here, or None.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "mosquitto"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
ROUNDS = 101  # mosquitto_passwd's PBKDF2 rounds in 2.0


def missing() -> str | None:
    return None if MOSQUITTO else "mosquitto is not installed (apt-get install mosquitto)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ROUNDS)
    return f"$7${ROUNDS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_private(path: Path, text: str) -> None:
    """Write a secret file created 0600 (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def conf_text(port: int, passwd: Path, acl: Path) -> str:
    """deploy/mosquitto/passwd-acl.conf with this run's listener and files; every tuning line is kept."""
    text = (DEPLOY / "passwd-acl.conf").read_text()
    for old, new in {
        "listener 1883\n": f"listener {port} 127.0.0.1\n",
        "/etc/mosquitto/slmops.passwd": str(passwd),
        "/etc/mosquitto/slmops.acl": str(acl),
        "persistence true": "persistence false",
    }.items():
        if old not in text:
            raise RuntimeError(f"deploy/mosquitto/passwd-acl.conf no longer says {old!r}")
        text = text.replace(old, new)
    return text + ("user root\n" if os.geteuid() == 0 else "")  # as root it would drop to a user that cannot read


class Mosquitto:
    def __init__(self, workdir: Path, accounts: Mapping[str, str], fleet_password: str) -> None:
        if "fleet" in accounts:
            raise ValueError("no device may be called 'fleet' (the fleet's own broker user)")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        passwd, acl = self.dir / "slmops.passwd", self.dir / "slmops.acl"
        lines = [f"fleet:{hash_password(fleet_password)}"]
        lines += [f"{user}:{hash_password(pw)}" for user, pw in accounts.items()]
        write_private(passwd, "\n".join(lines) + "\n")
        shutil.copyfile(DEPLOY / "slmops.acl", acl)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(conf_text(self.port, passwd, acl))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt5://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "Mosquitto":
        assert MOSQUITTO is not None, missing()
        self.log = (self.dir / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.dir / 'mosquitto.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on 127.0.0.1:{self.port} in {timeout_s:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
