"""Typed MQTT messages with a schema version, a sequence number and room for signatures.

Every message is a JSON object with a common header:
    kind            which message ("deploy", "cancel", "status", "telemetry", "presence")
    schema_version  integer; a receiver refuses versions it does not know
    message_id      unique id, for de-duplication of QoS 1 redelivery
    seq             per-sender counter that only grows; a receiver drops what it has already seen
    sent_at         UTC timestamp from the sender's clock
    signatures      optional list of {"keyid", "sig"} over the canonical bytes of the message without this field
                    (`protocol.trust.sign_message` / `verify_message`); the fleet signs every command with its
                    command key, named by the trust root (`protocol.root`) whose version `root_version` carries

Payloads become typed objects at the edge with `parse_message(bytes)`; send with `encode(message)`.

Every identifier in a message is checked with a strict full-match pattern and a bound while it is parsed: device
ids (`protocol.topics.check_device_id`), deployment and message ids (here), bundle names, versions (1 to 2**63 - 1,
never a bool, string or float) and key ids (`protocol.manifest`); counters and sizes fit 63 bits.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import MessageError, clip
from .manifest import (
    MAX_VERSION,
    BundleName,
    Count,
    KeyId,
    MetricName,
    Score,
    Sha256,
    Version,
    canonical_bytes,
    check_identifier,
    first_error,
    validated,
)
from .topics import check_device_id

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # bytes: larger MQTT payloads are refused unparsed
MAX_URL_CHARS = 2048  # characters in a bundle URL
MAX_DETAIL_CHARS = 4096  # characters of a status report's detail; senders cut longer ones
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # deployment and message ids; always with fullmatch
SIG_RE = re.compile(r"[0-9a-f]{128}")  # an Ed25519 signature, hex


def check_deployment_id(deployment_id: object) -> str:
    """A deployment id: 1-128 chars of letters, digits, '.', '_', '-', starting with a letter or digit (so never
    '.', '..' or a path)."""
    return check_identifier(
        deployment_id, ID_RE, 128, "deployment id",
        "use 1-128 chars of letters, digits, '.', '_', '-' starting with a letter or digit",
    )


def check_message_id(message_id: object) -> str:
    """A message id: the same shape as a deployment id (the senders use a uuid4 in hex)."""
    return check_identifier(
        message_id, ID_RE, 128, "message id",
        "use 1-128 chars of letters, digits, '.', '_', '-' starting with a letter or digit",
    )


def check_signature_hex(sig: object) -> str:
    """An Ed25519 signature: 128 lowercase hex digits."""
    return check_identifier(sig, SIG_RE, 128, "signature", "use the 128 lowercase hex digits of an Ed25519 signature")


DeviceId = Annotated[str, validated(check_device_id)]
DeploymentId = Annotated[str, validated(check_deployment_id)]
MessageId = Annotated[str, validated(check_message_id)]
Gauge = Annotated[float, Field(ge=0, allow_inf_nan=False)]


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
    DOWNLOADED = "downloaded"  # a download-only command: downloaded and fully verified into staging, nothing installed

    @property
    def terminal(self) -> bool:
        return self in (UpdateState.ACTIVE, UpdateState.REJECTED, UpdateState.ROLLED_BACK, UpdateState.FAILED,
                        UpdateState.DOWNLOADED)


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    keyid: KeyId
    sig: Annotated[str, validated(check_signature_hex)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: MessageId = Field(default_factory=lambda: uuid.uuid4().hex)
    seq: Count = 0
    sent_at: datetime
    signatures: tuple[Signature, ...] = ()

    def signing_bytes(self) -> bytes:
        """Canonical bytes a signature covers (the message without its signatures, and without the later optional
        fields left at their default, exactly as `encode` leaves them off the wire: a receiver of an earlier
        release computes the same bytes)."""
        return canonical_bytes(self.model_dump(mode="json", exclude={"signatures"} | _unset_later(self)))


class BundleRef(BaseModel):
    """Where to fetch a bundle and what it must hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: BundleName
    version: Version
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    sha256: Sha256
    size: int = Field(ge=1, le=MAX_VERSION)


class DeployCommand(_Message):
    """Fleet -> device: install this bundle (or, with `download_only`, download and verify it into staging only:
    the device answers `downloaded`, and a later command for the same bundle installs it without downloading)."""

    kind: Literal["deploy"] = "deploy"
    root_version: Version = 1  # the fleet's trust root when it signed this; a device behind it walks the chain
    deployment_id: DeploymentId
    device_id: DeviceId
    bundle: BundleRef
    download_only: bool = Field(default=False, strict=True)  # off the wire when false (see LATER_FIELDS)


class CancelCommand(_Message):
    """Fleet -> device: stop this deployment if its install has not begun (answered with a terminal report)."""

    kind: Literal["cancel"] = "cancel"
    root_version: Version = 1  # as for DeployCommand
    deployment_id: DeploymentId
    device_id: DeviceId


MAX_EVAL_ITEMS_REPORTED = 1000  # items: the most a reported held-out score may be measured over


class EvalScore(BaseModel):
    """The aggregate score a device measured on its bundle's held-out evaluation set: the metric's name, the share
    of items answered right, and how many items. Never a prompt or an answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: MetricName
    score: Score
    n: int = Field(ge=1, le=MAX_EVAL_ITEMS_REPORTED, strict=True)


class StatusReport(_Message):
    """Device -> fleet: a step of an update, with the reason when it failed, and the held-out score the device
    measured (on the `active` report, and on the terminal report of an update that scored below the bundle's own
    minimum)."""

    kind: Literal["status"] = "status"
    device_id: DeviceId
    deployment_id: DeploymentId
    bundle_name: BundleName
    bundle_version: Version
    state: UpdateState
    active_version: Version | None = None  # what serves after this step
    error_code: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,63}$")  # a code from protocol.errors
    detail: str = Field(default="", max_length=MAX_DETAIL_CHARS)  # the reason in words, for a field engineer
    eval: EvalScore | None = None  # absent in reports of agents before the held-out set, and of bundles without one


class ActiveModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: BundleName
    version: Version


class Telemetry(_Message):
    """Device -> fleet: a health sample. Counters and gauges only; never prompt or answer text."""

    kind: Literal["telemetry"] = "telemetry"
    device_id: DeviceId
    active: ActiveModel | None = None
    uptime_s: Gauge
    requests_total: Count
    tokens_generated_total: Count
    tokens_per_s: Gauge
    cpu_percent: Gauge
    memory_rss_mb: Gauge
    memory_percent: Gauge


class Presence(_Message):
    """Device -> fleet: online when connected (retained), offline as the MQTT last will or on clean exit."""

    kind: Literal["presence"] = "presence"
    device_id: DeviceId
    online: bool
    agent_version: str = ""
    active: ActiveModel | None = None


Message = Annotated[
    Union[DeployCommand, CancelCommand, StatusReport, Telemetry, Presence], Field(discriminator="kind")
]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


def parse_message(payload: bytes) -> DeployCommand | CancelCommand | StatusReport | Telemetry | Presence:
    """Bytes from the wire -> a typed message, or MessageError saying what is wrong.

    The size is checked before anything is parsed; JSON that Python refuses to build (a number past the int-string
    digit limit, nesting past the recursion limit, bad UTF-8) is a MessageError like any other malformed payload.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8 and the int-digit limit are ValueErrors
        raise MessageError(f"message is not JSON: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if not isinstance(doc, dict):
        raise MessageError("message must be a JSON object")
    if doc.get("schema_version") not in (None, SCHEMA_VERSION):
        raise MessageError(
            f"message schema_version {clip(doc.get('schema_version'))} is not supported "
            f"(this release speaks {SCHEMA_VERSION})"
        )
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        kind = doc["kind"][:20] if isinstance(doc.get("kind"), str) else "message"
        raise MessageError(f"{kind} does not match its schema: {first_error(exc)}") from exc


# optional fields added after schema_version 1 first shipped: left out of the wire (and of the signed bytes) while
# at their default, so a receiver of an earlier release (its models forbid unknown keys) still reads what this one
# sends and verifies its signature; a command that sets one is refused by such a receiver, never misread
LATER_FIELDS = frozenset({"eval", "download_only"})


def _unset_later(message: BaseModel) -> set[str]:
    fields = type(message).model_fields
    return {f for f in LATER_FIELDS if f in fields and getattr(message, f) == fields[f].default}


def encode(message: _Message) -> bytes:
    return message.model_dump_json(exclude=_unset_later(message) or None).encode()
