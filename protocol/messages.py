"""Typed MQTT messages with a schema version, a sequence number and room for signatures.

Every message is a JSON object with a common header:
    kind            which message ("deploy", "status", "telemetry", "presence")
    schema_version  integer; a receiver refuses versions it does not know
    message_id      unique id, for de-duplication of QoS 1 redelivery
    seq             per-sender counter that only grows; a receiver drops what it has already seen
    sent_at         UTC timestamp from the sender's clock
    signatures      optional list of {"keyid", "sig"} over the canonical bytes of the message without this field

Payloads become typed objects at the edge with `parse_message(bytes)`; send with `encode(message)`.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import MessageError
from .manifest import NAME_RE, first_error, canonical_bytes

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # bytes: larger MQTT payloads are refused unparsed


class UpdateState(str, Enum):
    """Steps of a device update as reported to the fleet (see agent.update for the state machine)."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health_check"
    ACTIVE = "active"  # success: the new version serves
    REJECTED = "rejected"  # refused before install (bad signature, hash, version...); old version untouched
    ROLLED_BACK = "rolled_back"  # installed but failed; the previous version serves again
    FAILED = "failed"  # could not complete for another reason (download, disk); old version untouched

    @property
    def terminal(self) -> bool:
        return self in (UpdateState.ACTIVE, UpdateState.REJECTED, UpdateState.ROLLED_BACK, UpdateState.FAILED)


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    keyid: str
    sig: str


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = Field(default=0, ge=0)
    sent_at: datetime
    signatures: tuple[Signature, ...] = ()

    def signing_bytes(self) -> bytes:
        """Canonical bytes a signature covers (the message without its signatures)."""
        return canonical_bytes(self.model_dump(mode="json", exclude={"signatures"}))


class BundleRef(BaseModel):
    """Where to fetch a bundle and what it must hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern)
    version: int = Field(ge=1)
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)


class DeployCommand(_Message):
    """Fleet -> device: install this bundle."""

    kind: Literal["deploy"] = "deploy"
    deployment_id: str
    device_id: str
    bundle: BundleRef


class StatusReport(_Message):
    """Device -> fleet: a step of an update, with the reason when it failed."""

    kind: Literal["status"] = "status"
    device_id: str
    deployment_id: str
    bundle_name: str
    bundle_version: int
    state: UpdateState
    active_version: int | None = None  # what serves after this step
    error_code: str | None = None
    detail: str = ""


class ActiveModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    version: int


class Telemetry(_Message):
    """Device -> fleet: a health sample. Counters and gauges only; never prompt or answer text."""

    kind: Literal["telemetry"] = "telemetry"
    device_id: str
    active: ActiveModel | None = None
    uptime_s: float = Field(ge=0)
    requests_total: int = Field(ge=0)
    tokens_generated_total: int = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    cpu_percent: float = Field(ge=0)
    memory_rss_mb: float = Field(ge=0)
    memory_percent: float = Field(ge=0)


class Presence(_Message):
    """Device -> fleet: online when connected (retained), offline as the MQTT last will or on clean exit."""

    kind: Literal["presence"] = "presence"
    device_id: str
    online: bool
    agent_version: str = ""
    active: ActiveModel | None = None


Message = Annotated[Union[DeployCommand, StatusReport, Telemetry, Presence], Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


def parse_message(payload: bytes) -> DeployCommand | StatusReport | Telemetry | Presence:
    """Bytes from the wire -> a typed message, or MessageError saying what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"message is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MessageError("message must be a JSON object")
    if doc.get("schema_version") not in (None, SCHEMA_VERSION):
        raise MessageError(f"message schema_version {doc.get('schema_version')!r} is not supported (this release speaks {SCHEMA_VERSION})")
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        raise MessageError(f"{doc.get('kind', 'message')!s} does not match its schema: {first_error(exc)}") from exc


def encode(message: _Message) -> bytes:
    return message.model_dump_json().encode()
