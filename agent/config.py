"""The agent's settings in one dataclass, with the unit of every limit beside it.

Workflow: `slmops agent run` builds an `AgentConfig` from its flags (or a test builds one directly); every other
agent module receives the parts it needs and reads nothing from the environment itself. `fleet_tls(...)` turns the
fleet TLS files into what the agent's HTTP client verifies the fleet with (bundle downloads, root fetches, enrolment).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from protocol.errors import ConfigError
from protocol.topics import check_device_id

DEFAULT_PORTS = {"http": 80, "https": 443}
Origin = tuple[str, str, int]  # scheme, host (lowercase), port


@dataclass(frozen=True)
class Limits:
    """Size and time limits for updates."""

    max_bundle_bytes: int = 8 << 30  # bytes: a bundle larger than this is refused while downloading
    download_timeout_s: float = 60.0  # seconds without progress before a download attempt fails
    download_attempts: int = 5  # tries, resuming with HTTP Range after the first
    health_timeout_s: float | None = None  # seconds; None: the bundle's own health.timeout_s
    download_deadline_s: float = 1800.0  # seconds for a whole download, every attempt and back-off included
    download_min_rate_bps: int = 1024  # bytes/s averaged over download_rate_window_s; slower fails (0: no minimum)
    download_rate_window_s: float = 30.0  # seconds over which the download rate is averaged
    check_hashes: bool = False  # sha256 every file of the active model at start and before "already active"
    #                             (sizes are always checked; hashing costs about a second per GB)

    def __post_init__(self) -> None:
        if self.download_deadline_s <= 0 or self.download_rate_window_s <= 0 or self.download_min_rate_bps < 0:
            raise ConfigError("download deadline and rate window must be positive, the minimum rate 0 or more")


@dataclass(frozen=True)
class Serving:
    """How the local API admits requests and how the model runs them (see agent/scheduler.py)."""

    queue_size: int = 16  # requests: waiting for a generation worker; one more gets 429 with Retry-After
    workers: int = 1  # generation workers sharing the model; small devices have few cores
    intra_op_threads: int = 0  # onnxruntime threads per generation; 0: one per core the process may use
    spinning: bool = False  # onnxruntime threads spin between ops: a little faster on idle cores, burns CPU
    request_timeout_s: float = 300.0  # seconds: a request still generating (or queued) after this ends
    default_max_tokens: int = 512  # tokens: the answer's budget when a request names none (capped by context)
    max_body_bytes: int = 1 << 20  # bytes: a larger request body gets 413
    api_key: str | None = field(default=None, repr=False)  # Authorization: Bearer <key> on every /v1 route
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted besides loopback names and the bind host
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; empty: CORS off

    def __post_init__(self) -> None:
        for name in ("queue_size", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be 0 (one per core) or more, not {self.intra_op_threads}")
        if self.request_timeout_s <= 0 or self.default_max_tokens < 1 or self.max_body_bytes < 1024:
            raise ConfigError("request_timeout_s, default_max_tokens and max_body_bytes (>= 1024) must be positive")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("an API key must be at least 16 characters long")


def parse_origin(url: str) -> Origin:
    """A configured bundle origin, http(s)://host[:port] with nothing after it; ConfigError otherwise."""
    try:
        u = urlsplit(url.strip())
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"bundle origin {url[:80]!r} is not a URL: {exc}") from exc
    scheme = u.scheme.lower()
    if scheme not in DEFAULT_PORTS or not u.hostname or u.username or u.password or u.query or u.fragment \
            or u.path not in ("", "/"):
        raise ConfigError(f"bundle origin {url[:80]!r} must be http(s)://host[:port], the fleet's public URL")
    return scheme, u.hostname.lower(), port or DEFAULT_PORTS[scheme]


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data_dir: Path
    broker_url: str = "mqtt://127.0.0.1:1883"
    trust_root: Path | None = None  # root.json the device is provisioned with (required; see agent/commands.py)
    bundle_origins: tuple[str, ...] = ()  # the fleet's public URLs; bundle URLs must be on one (required)
    api_host: str = "127.0.0.1"
    api_port: int = 8800  # 0: pick a free port
    telemetry_interval_s: float = 30.0  # seconds between telemetry samples
    reconnect_max_s: float = 10.0  # seconds: the longest wait between two tries to reach the broker
    broker_username: str | None = None  # this device's broker account (from enrolment); None: connect anonymously
    broker_password: str | None = field(default=None, repr=False)
    broker_ca_file: Path | None = None  # PEM CA the broker's certificate must chain to (mqtts://); None: system store
    broker_cert_file: Path | None = None  # PEM client certificate for mutual TLS
    broker_key_file: Path | None = None  # its private key (PEM), unless it is in broker_cert_file
    limits: Limits = field(default_factory=Limits)
    serving: Serving = field(default_factory=Serving)
    fleet_token: str | None = field(default=None, repr=False)  # Authorization: Bearer for bundle downloads
    fleet_ca_file: Path | None = None  # PEM CA the fleet's HTTPS certificate must chain to; None: the system store
    fleet_cert_file: Path | None = None  # PEM client certificate for a mutual-TLS fleet (bundle and root downloads)
    fleet_key_file: Path | None = None  # its private key (PEM), unless it is in fleet_cert_file

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.trust_root is None:
            raise ConfigError("no trust root given: pass --trust-root PATH (the root.json made by 'slmops keys init' "
                              "or served at <fleet>/api/v1/trust/root.json)")
        object.__setattr__(self, "trust_root", Path(self.trust_root))
        if not self.bundle_origins:
            raise ConfigError("no bundle origin given: pass --bundle-origin URL (the fleet's public URL, e.g. "
                              "http://fleet.example:8700); bundles are downloaded only from there")
        object.__setattr__(self, "bundle_origins", tuple(self.bundle_origins))
        for origin in self.bundle_origins:
            parse_origin(origin)
        for name in ("fleet_ca_file", "fleet_cert_file", "fleet_key_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        check_fleet_tls(self.fleet_ca_file, self.fleet_cert_file, self.fleet_key_file)
        if self.api_host not in LOOPBACK_HOSTS and not self.serving.api_key:
            raise ConfigError(
                f"the local API would listen on {self.api_host}, beyond this device: set an API key "
                "(--api-key or SLMOPS_AGENT_API_KEY) so that only your applications can use the model"
            )


def check_fleet_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
    """Refuse a key without its certificate and files that are not there (ConfigError, naming the option)."""
    if key_file is not None and cert_file is None:
        raise ConfigError("--fleet-key was given without --fleet-cert: give the client certificate too")
    for opt, path in (("--fleet-ca", ca_file), ("--fleet-cert", cert_file), ("--fleet-key", key_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{opt} {str(path)[:200]} does not exist or is not a file")


def fleet_tls(ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
              ) -> ssl.SSLContext | bool:
    """What the agent's HTTP client verifies the fleet with: True (the system store) when nothing is given, else a
    TLS 1.2+ context that trusts `ca_file` (or the system store) and checks the host name, presenting `cert_file`
    when the fleet asks for a client certificate (mutual TLS)."""
    check_fleet_tls(ca_file, cert_file, key_file)
    if ca_file is None and cert_file is None:
        return True
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)  # only this CA, when given
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot use --fleet-ca {str(ca_file)[:200]}: {str(exc)[:120]}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert_file is not None:
            ctx.load_cert_chain(str(cert_file), keyfile=str(key_file) if key_file else None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot use --fleet-cert {str(cert_file)[:200]} / --fleet-key: {str(exc)[:120]}") from exc
    return ctx
