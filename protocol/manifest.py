"""The bundle manifest and the canonical bytes that signatures cover.

A manifest describes one bundle: what model it is, which runtime and precision it targets, every file with its
size and sha256, the integer version (it only grows), when it was made and when it expires, the eval metrics
measured by the trainer, the smoke prompts the device's health check runs, and resource budgets.

Workflow: the fleet builds a `Manifest`, signs `canonical_bytes(manifest.to_signed())` (see `protocol.trust`),
and stores the envelope beside the files; the agent parses the envelope bytes back with `Manifest.from_signed()`
only after the signatures check out.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ManifestError

MANIFEST_SCHEMA_VERSION = 1
BUNDLE_FORMAT = "onnxruntime-genai"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_bytes(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"value cannot be written as canonical JSON: {exc}") from exc


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of the model folder, by its path relative to the folder."""

    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        parts = v.split("/")
        if not v or v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe file path {v!r}: must be relative, '/'-separated, without '.' or '..'")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v


class Target(_Frozen):
    """What the bundle runs on."""

    runtime: Literal["onnxruntime-genai"] = "onnxruntime-genai"
    precision: Literal["int4", "int8", "fp16", "fp32"] = "int4"
    execution_provider: str = "cpu"


class EvalMetrics(_Frozen):
    """Metrics the trainer measured on the held-out split, e.g. {"accuracy": 0.93}."""

    dataset: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)


class SmokePrompt(_Frozen):
    """A prompt the device's health check answers; `expect` is a regex the answer must match (search)."""

    prompt: str
    expect: str = r"\S"

    @field_validator("expect")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"expect is not a valid regex: {exc}") from exc
        return v


class HealthCheck(_Frozen):
    """How the device decides that a freshly installed model works."""

    prompts: tuple[SmokePrompt, ...] = (SmokePrompt(prompt="Hello"),)
    max_new_tokens: int = Field(default=16, ge=1, le=4096)
    timeout_s: float = Field(default=60.0, gt=0)


class Budgets(_Frozen):
    """Resource budgets the model must stay within on the device (None: no budget)."""

    max_latency_ms: float | None = Field(default=None, gt=0)
    max_memory_mb: float | None = Field(default=None, gt=0)


class BaseRef(_Frozen):
    """For an adapter-only bundle: the base bundle it applies to."""

    name: str
    version: int = Field(ge=1)
    sha256: str


class Manifest(_Frozen):
    """The signed part of a bundle's envelope."""

    type: Literal["slmops-bundle"] = "slmops-bundle"
    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    base_model: str = ""
    format: Literal["onnxruntime-genai"] = BUNDLE_FORMAT
    target: Target = Target()
    files: tuple[FileEntry, ...]
    created: datetime
    expires: datetime | None = None
    eval: EvalMetrics = EvalMetrics()
    health: HealthCheck = HealthCheck()
    budgets: Budgets = Budgets()
    base: BaseRef | None = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("name must be 1-64 chars of a-z, 0-9, '.', '_', '-' and start with a letter or digit")
        return v

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v != MANIFEST_SCHEMA_VERSION:
            raise ValueError(f"manifest schema_version {v} is not supported (this release reads {MANIFEST_SCHEMA_VERSION})")
        return v

    @field_validator("created", "expires")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("timestamps must carry a timezone (use UTC, e.g. 2026-01-01T00:00:00Z)")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        if not v:
            raise ValueError("a bundle must name at least one file")
        paths = [f.path for f in v]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        return tuple(sorted(v, key=lambda f: f.path))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def is_expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def to_signed(self) -> dict[str, Any]:
        """The JSON object that goes under "signed" in the envelope."""
        return self.model_dump(mode="json")

    @classmethod
    def from_signed(cls, signed: Any) -> "Manifest":
        try:
            return cls.model_validate(signed)
        except ValidationError as exc:
            raise ManifestError(f"manifest does not match the schema: {first_error(exc)}") from exc


def first_error(exc: ValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return str(exc)
    e = errs[0]
    loc = ".".join(str(p) for p in e.get("loc", ()))
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc or 'value'}: {e.get('msg')}{more}"


def utc(ts: str | datetime) -> datetime:
    """Parse an ISO-8601 timestamp (or pass through a datetime) as an aware UTC datetime."""
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00")) if isinstance(ts, str) else ts
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
