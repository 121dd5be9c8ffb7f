"""The agent's settings in one dataclass, with the unit of every limit beside it.

Workflow: `slmops agent run` builds an `AgentConfig` from its flags (or a test builds one directly); every other
agent module receives the parts it needs and reads nothing from the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ConfigError
from protocol.topics import check_device_id
from protocol.trust import Keyring, PublicKey


@dataclass(frozen=True)
class Limits:
    """Size and time limits for updates."""

    max_bundle_bytes: int = 8 << 30  # bytes: a bundle larger than this is refused while downloading
    download_timeout_s: float = 60.0  # seconds without progress before a download attempt fails
    download_attempts: int = 5  # tries, resuming with HTTP Range after the first
    health_timeout_s: float | None = None  # seconds; None: the bundle's own health.timeout_s


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data_dir: Path
    broker_url: str = "mqtt://127.0.0.1:1883"
    trusted_keys: tuple[Path, ...] = ()
    threshold: int = 1
    api_host: str = "127.0.0.1"
    api_port: int = 8800  # 0: pick a free port
    telemetry_interval_s: float = 30.0  # seconds between telemetry samples
    max_context_tokens: int = 1024  # tokens: prompt + answer, per request
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    def keyring(self) -> Keyring:
        if not self.trusted_keys:
            raise ConfigError("no trusted key given: pass --trusted-key PATH.pub (the fleet's public signing key)")
        keys = []
        for path in self.trusted_keys:
            try:
                keys.append(PublicKey.from_pem(Path(path).read_bytes()))
            except OSError as exc:
                raise ConfigError(f"cannot read trusted key {path}: {exc.strerror}") from exc
        return Keyring(tuple(keys), self.threshold)
