"""The device's identity: enrol once with a one-time token, keep the answer in `<data_dir>/state/identity.json`.

Workflow: `slmops agent enrol` calls `enrol(fleet_url, token, device_id)`, which POSTs the token to the fleet's
`/api/v1/enrol` and parses the answer (`Identity.parse`, strict and bounded), then `save_identity` writes it to
`state/identity.json`, created 0600 (never readable by others, not even for a moment). `slmops agent run` then
`resolve`s its credentials: what the command line gives wins, the identity file fills the rest (the device API
token for bundle downloads, the broker username and password, the broker URL).
"""

from __future__ import annotations

import json
import os
import re
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from protocol.errors import ConfigError, TopicError, TransportError, clip
from protocol.topics import check_device_id

IDENTITY_FILE = "identity.json"
MAX_IDENTITY_BYTES = 16 * 1024  # bytes: a larger identity file or enrolment answer is refused
SECRET_RE = re.compile(r"[\x21-\x7e]{16,256}")  # printable ASCII without spaces; always with fullmatch
URL_RE = re.compile(r"(https?|mqtts?|mqtt5s?)://[\x21-\x7e]{1,500}")
ENROL_TIMEOUT_S = 30.0  # seconds for the enrolment request


@dataclass(frozen=True)
class Identity:
    device_id: str
    broker_username: str
    broker_password: str = field(repr=False)
    api_token: str = field(repr=False)
    broker_url: str
    fleet_url: str

    @classmethod
    def parse(cls, data: bytes) -> "Identity":
        """An identity from the fleet's answer or the file; ConfigError saying what is wrong otherwise."""
        if len(data) > MAX_IDENTITY_BYTES:
            raise ConfigError(f"identity is {len(data)} bytes, over {MAX_IDENTITY_BYTES}; enrol again")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, int digit limit, nested too deep
            raise ConfigError(f"identity is not JSON ({exc.__class__.__name__}); enrol again") from exc
        names = [f.name for f in cls.__dataclass_fields__.values()]
        if not isinstance(doc, dict) or not all(isinstance(doc.get(n), str) for n in names):
            raise ConfigError(f"identity must be a JSON object with the strings {', '.join(names)}; enrol again")
        for name in ("device_id", "broker_username"):
            try:
                check_device_id(doc[name])
            except TopicError as exc:
                raise ConfigError(f"identity's {name}: {exc}; enrol again") from exc
        for name in ("broker_password", "api_token"):
            if not SECRET_RE.fullmatch(doc[name]):
                raise ConfigError(f"identity's {name} is not a 16-256 character printable secret; enrol again")
        for name in ("broker_url", "fleet_url"):
            if not URL_RE.fullmatch(doc[name]):
                raise ConfigError(f"identity's {name} {clip(doc[name])} is not an http(s) or mqtt URL; enrol again")
        return cls(**{n: doc[n] for n in names})


def enrol(fleet_url: str, token: str, device_id: str, *, client: httpx.Client | None = None,
          verify: ssl.SSLContext | bool = True) -> Identity:
    """Trade a one-time enrolment token for this device's identity. `verify`: how the fleet's HTTPS certificate is
    checked (`agent.config.fleet_tls`: the project CA, and a client certificate for a mutual-TLS fleet); the CA and
    certificate paths are not stored in the identity, `agent run` takes them again."""
    check_device_id(device_id)
    own = client is None
    http = client or httpx.Client(timeout=ENROL_TIMEOUT_S, verify=verify)
    url = fleet_url.rstrip("/") + "/api/v1/enrol"
    try:
        r = http.post(url, json={"token": token, "device_id": device_id})
        body = r.content[: MAX_IDENTITY_BYTES + 1]
    except httpx.HTTPError as exc:
        tls = "CERTIFICATE" in str(exc).upper()
        hint = "check --fleet-ca (the CA that issued the fleet's certificate)" if tls else "check --fleet"
        raise TransportError(f"cannot reach the fleet at {clip(fleet_url, 200)}: {exc.__class__.__name__}; {hint}") from exc
    finally:
        if own:
            http.close()
    if r.status_code != 201:
        try:
            detail = str(json.loads(body).get("detail", ""))[:300]
        except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, too deep to read or print
            detail = ""
        raise ConfigError(f"the fleet refused the enrolment (HTTP {r.status_code}): {detail or 'no reason given'}")
    identity = Identity.parse(body)
    if identity.device_id != device_id:
        raise ConfigError(f"the fleet enrolled {identity.device_id!r}, not {device_id!r}; enrol again")
    return identity


def identity_path(data_dir: Path) -> Path:
    return Path(data_dir) / "state" / IDENTITY_FILE


def save_identity(data_dir: Path, identity: Identity) -> Path:
    """Write the identity file, created 0600 through a temp file in the same folder and one rename."""
    path = identity_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{IDENTITY_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(identity), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_identity(data_dir: Path) -> Identity | None:
    """The saved identity, or None when the device never enrolled. A file others may read is refused."""
    path = identity_path(data_dir)
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} may be read by other users; run 'chmod 600 {path}' (or enrol again)")
        with path.open("rb") as f:
            data = f.read(MAX_IDENTITY_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return Identity.parse(data)


@dataclass(frozen=True)
class Credentials:
    """What `agent run` uses: the command line's values, else the identity file's."""

    broker_url: str
    fleet_token: str | None = field(default=None, repr=False)
    broker_username: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    bundle_origins: tuple[str, ...] = ()  # the enrolled fleet's URL: where bundles (and new roots) come from


DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def resolve(data_dir: Path, device_id: str, *, fleet_token: str | None, broker_url: str | None) -> Credentials:
    identity = load_identity(data_dir)
    if identity is None:
        return Credentials(broker_url=broker_url or DEFAULT_BROKER, fleet_token=fleet_token or None)
    if identity.device_id != device_id:
        raise ConfigError(
            f"{identity_path(data_dir)} belongs to device {identity.device_id!r}, not {device_id!r}; "
            "use that device id or enrol this one"
        )
    return Credentials(
        broker_url=broker_url or identity.broker_url,
        fleet_token=fleet_token or identity.api_token,
        broker_username=identity.broker_username,
        broker_password=identity.broker_password,
        bundle_origins=(identity.fleet_url,),
    )
