"""The fleet's settings, read once from `SLMOPS_FLEET_*` environment variables (or passed in by tests and the CLI).

Workflow: `Settings()` reads the environment; fields left unset are derived from the others in one place
(`database_url` from `data_dir`, `public_url` from `host`/`port`). `broker_url=None` means the fleet starts its
own embedded MQTT broker on `embedded_broker_host:embedded_broker_port`; `effective_broker_url` says which one the
fleet talks to either way. `tls_cert_file` + `tls_key_file` turn on HTTPS (and make the derived `public_url`
https); `tls_client_ca_file` adds mutual TLS (every HTTP client presents a certificate from that CA) and
`tls_crl_file` refuses the certificates that CRL revokes (see fleet/tls.py and `slmops ca`).
`embedded_broker_tls_cert_file` + `embedded_broker_tls_key_file` put the embedded broker's listener on TLS (then
`effective_broker_url` is `mqtts://`, and `broker_ca_file` must name the CA the fleet's own client trusts it by).
`public_broker_url` is the broker URL enrolment hands to devices (default: `effective_broker_url`), for a broker
the devices reach under another name or port than the fleet does.

Secrets: `admin_token` (the bootstrap admin's API token) and `broker_password` (the fleet's own MQTT password,
user "fleet") are `SecretStr`, so they never show in a repr or a log. `check_startable()` refuses, outside demo
mode, a fleet without a trusted bundle key (`trusted_keys` or `trust_dir`) and one whose secrets are empty, short
or a known default. In demo mode (`demo=True`, set only by `slmops demo` and tests) empty secrets are generated at
random; the app writes them to `<data_dir>/demo-secrets.json` (0600) and logs that path.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.errors import ConfigError, TopicError
from protocol.topics import BrokerAddress

GIB = 1 << 30
MIN_ADMIN_TOKEN_CHARS = 32
MIN_BROKER_PASSWORD_CHARS = 16
# Values no deployment may keep: common defaults and the placeholders our docs and deploy/ examples show.
EXAMPLE_SECRETS = (
    "slm_example-admin-token-replace-me-000000000000",
    "example-broker-password-replace-me",
)
KNOWN_DEFAULTS = frozenset({"changeme", "change-me", "admin", "secret", "password", "fleet", "slmops", *EXAMPLE_SECRETS})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_FLEET_", extra="forbid")

    data_dir: Path = Path("./fleet-data")  # bundles/, tmp/ and the default SQLite file live here
    database_url: str = ""  # empty: sqlite file <data_dir>/fleet.db
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    public_url: str = ""  # base URL devices download from; empty: http://<host>:<port>
    broker_url: str | None = None  # mqtt://host:port (MQTT 3.1.1) or mqtt5://host:port; None: embedded broker
    embedded_broker_host: str = "127.0.0.1"
    embedded_broker_port: int = Field(default=1883, ge=1, le=65535)
    embedded_broker_tls_cert_file: Path | None = None  # PEM certificate: the embedded broker listens with TLS only
    embedded_broker_tls_key_file: Path | None = None  # PEM private key of embedded_broker_tls_cert_file
    public_broker_url: str = ""  # broker URL enrolment gives devices; empty: effective_broker_url
    client_id: str = "slmops-fleet"  # MQTT client id: slmops-fleet or slmops-fleet-<replica>; give each replica its own
    broker_username: str = "fleet"  # the fleet's broker account
    broker_ca_file: Path | None = None  # PEM CA the broker's certificate must chain to (mqtts://); None: system store
    broker_cert_file: Path | None = None  # PEM client certificate for a broker that asks for one (mutual TLS)
    broker_key_file: Path | None = None  # its private key (PEM), unless it is in broker_cert_file
    broker_admin_username: str | None = None  # external mosquitto: the dynamic-security admin that enrols devices
    broker_admin_password: str | None = Field(default=None, repr=False)
    reconnect_max_s: float = Field(default=10.0, gt=0)  # seconds: the longest wait between two tries to reach the broker
    trust_dir: Path | None = None  # trust folder (slmops keys init): signs commands, serves roots, keys uploads
    trusted_keys: list[Path] = Field(default_factory=list)  # without trust_dir: .pub files uploads must be signed by
    trust_threshold: int = Field(default=1, ge=1)  # distinct trusted keys that must sign an upload
    max_bundle_bytes: int = Field(default=8 * GIB, ge=1)  # bytes: larger uploads are refused while they stream
    tls_cert_file: Path | None = None  # PEM server certificate for HTTPS; None: plain HTTP
    tls_key_file: Path | None = None  # PEM private key of tls_cert_file
    tls_client_ca_file: Path | None = None  # set: mutual TLS, every client presents a certificate from this CA
    tls_crl_file: Path | None = None  # PEM CRL of that CA: revoked client certificates are refused
    admin_token: SecretStr = SecretStr("")  # bootstrap admin API token (>= 32 chars); env SLMOPS_FLEET_ADMIN_TOKEN
    broker_password: SecretStr = SecretStr("")  # the fleet's own MQTT password (username "fleet")
    demo: bool = False  # generate missing secrets, allow no trusted key: only `slmops demo` and tests set it
    rollout_tick_s: float = Field(default=5.0, gt=0, le=3600)  # seconds between two visits of every live rollout
    metrics_public: bool = False  # /metrics without a token (a scraper on a private network); else viewer role
    # Inbound MQTT ingest (fleet/ingest.py): a bounded queue drained by one writer thread in batches.
    ingest_queue_max: int = Field(default=10_000, ge=1)  # messages waiting for the writer; full: paho's thread waits
    ingest_batch_max: int = Field(default=500, ge=1)  # messages written in one database transaction, at most
    ingest_batch_wait_ms: int = Field(default=50, ge=0, le=10_000)  # milliseconds a batch waits to fill once begun
    ingest_put_timeout_s: float = Field(default=20.0, gt=0, le=40)  # seconds paho's thread waits on a full queue;
    # then that one message is dropped and counted (below 1.5 x the 30 s MQTT keepalive, so the broker keeps the fleet)
    ingest_stop_timeout_s: float = Field(default=10.0, gt=0)  # seconds stop() waits for the writer to drain the queue
    # Telemetry retention (fleet/retention.py): raw samples, then one row per device per step, then nothing.
    telemetry_raw_retention_s: int = Field(default=24 * 3600, ge=0)  # seconds raw samples are kept before rollup
    telemetry_rollup_step_s: int = Field(default=300, ge=1, le=24 * 3600)  # seconds one rollup row covers
    telemetry_rollup_retention_s: int = Field(default=30 * 24 * 3600, ge=0)  # seconds rollup rows are kept
    telemetry_retention_interval_s: float = Field(default=300.0, gt=0)  # seconds between two runs of the job
    telemetry_retention_chunk: int = Field(default=5_000, ge=1, le=100_000)  # rows per transaction (short locks)
    ingest_receive_maximum: int = Field(default=4_000, ge=0, le=65_535)  # messages: MQTT 5 Receive Maximum, how many
    # unacknowledged QoS 1 messages the broker may send the fleet (acks follow the commit), capped at ingest_queue_max
    # so the broker alone cannot fill the queue; 0: not sent (the broker's default applies)

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file for HTTPS, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs HTTPS: set tls_cert_file and tls_key_file too")
        if self.tls_crl_file is not None and self.tls_client_ca_file is None:
            raise ValueError("tls_crl_file checks client certificates: set tls_client_ca_file too")
        self._check_broker_tls()
        if self.telemetry_rollup_retention_s < self.telemetry_raw_retention_s:
            raise ValueError("telemetry_rollup_retention_s must be at least telemetry_raw_retention_s: rollups are "
                             "made from samples older than the raw retention")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fleet.db').as_posix()}"
        if not self.public_url:
            self.public_url = f"{self.scheme}://{self.host}:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        if not self.public_broker_url:
            self.public_broker_url = self.effective_broker_url
        try:
            BrokerAddress.parse(self.public_broker_url)
        except TopicError as exc:
            raise ValueError(f"public_broker_url: {exc}") from exc
        if self.demo:
            if not self.admin_token.get_secret_value():
                self.admin_token = SecretStr("slm_" + secrets.token_urlsafe(32))
            if not self.broker_password.get_secret_value():
                self.broker_password = SecretStr(secrets.token_urlsafe(32))
        return self

    def _check_broker_tls(self) -> None:
        if (self.embedded_broker_tls_cert_file is None) != (self.embedded_broker_tls_key_file is None):
            raise ValueError("set both embedded_broker_tls_cert_file and embedded_broker_tls_key_file for a TLS "
                             "embedded broker, or neither")
        if self.embedded_broker_tls_cert_file is None:
            return
        if self.broker_url is not None:
            raise ValueError("embedded_broker_tls_* configure the embedded broker, but broker_url names an external "
                             "one: unset broker_url, or configure TLS on that broker")
        if self.broker_ca_file is None:
            raise ValueError("a TLS embedded broker needs broker_ca_file: the CA that issued "
                             "embedded_broker_tls_cert_file, so the fleet's own MQTT client can trust it")

    def check_startable(self) -> None:
        """Raise ConfigError, saying what to set, unless the fleet may serve with these settings."""
        if self.demo:
            return
        if not self.trusted_keys and self.trust_dir is None:
            raise ConfigError(
                "no trusted bundle key: set SLMOPS_FLEET_TRUSTED_KEYS (or --trusted-key PATH.pub) or a trust_dir, "
                "so that the fleet stores only bundles your release keys signed"
            )
        for name, env, minimum in (
            ("admin_token", "SLMOPS_FLEET_ADMIN_TOKEN", MIN_ADMIN_TOKEN_CHARS),
            ("broker_password", "SLMOPS_FLEET_BROKER_PASSWORD", MIN_BROKER_PASSWORD_CHARS),
        ):
            value = getattr(self, name).get_secret_value()
            make = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            if not value:
                raise ConfigError(f"{name} is empty: set {env} to a random secret, e.g. from {make}")
            if value.strip().lower() in KNOWN_DEFAULTS:
                raise ConfigError(f"{name} is a known default or example value: set {env} to a random secret from {make}")
            if len(value) < minimum or len(set(value)) < 8:
                raise ConfigError(
                    f"{name} is too short or too uniform (at least {minimum} varied characters): set {env} from {make}"
                )

    @property
    def scheme(self) -> str:
        """https when the fleet serves TLS, else http."""
        return "https" if self.tls_cert_file is not None else "http"

    @property
    def effective_broker_url(self) -> str:
        """The broker the fleet talks to: `broker_url`, else the embedded one (mqtts:// when it listens with TLS)."""
        scheme = "mqtts" if self.embedded_broker_tls_cert_file is not None else "mqtt"
        return self.broker_url or f"{scheme}://{self.embedded_broker_host}:{self.embedded_broker_port}"

    def bundle_url(self, name: str, version: int) -> str:
        """Where devices download a stored bundle."""
        return f"{self.public_url}/api/v1/bundles/{name}/{version}/file"
