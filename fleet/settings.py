"""The fleet's settings, read once from `SLMOPS_FLEET_*` environment variables (or passed in by tests and the CLI).

Workflow: `Settings()` reads the environment; fields left unset are derived from the others in one place
(`database_url` from `data_dir`, `public_url` from `host`/`port`). `broker_url=None` means the fleet starts its
own embedded MQTT broker on `embedded_broker_host:embedded_broker_port`; `effective_broker_url` says which one the
fleet talks to either way.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30


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
    client_id: str = "slmops-fleet"  # MQTT client id: slmops-fleet or slmops-fleet-<replica>; give each replica its own
    broker_username: str = "fleet"  # the fleet's broker account
    broker_password: str | None = Field(default=None, repr=False)  # None with the embedded broker: a random one per start
    broker_ca_file: Path | None = None  # PEM CA the broker's certificate must chain to (mqtts://); None: system store
    broker_cert_file: Path | None = None  # PEM client certificate for a broker that asks for one (mutual TLS)
    broker_key_file: Path | None = None  # its private key (PEM), unless it is in broker_cert_file
    broker_admin_username: str | None = None  # external mosquitto: the dynamic-security admin that enrols devices
    broker_admin_password: str | None = Field(default=None, repr=False)
    reconnect_max_s: float = Field(default=10.0, gt=0)  # seconds: the longest wait between two tries to reach the broker
    trusted_keys: list[Path] = Field(default_factory=list)  # .pub files uploads must be signed by; empty: any signer
    trust_threshold: int = Field(default=1, ge=1)  # distinct trusted keys that must sign an upload
    max_bundle_bytes: int = Field(default=8 * GIB, ge=1)  # bytes: larger uploads are refused while they stream

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fleet.db').as_posix()}"
        if not self.public_url:
            self.public_url = f"http://{self.host}:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"mqtt://{self.embedded_broker_host}:{self.embedded_broker_port}"

    def bundle_url(self, name: str, version: int) -> str:
        """Where devices download a stored bundle."""
        return f"{self.public_url}/api/v1/bundles/{name}/{version}/file"
