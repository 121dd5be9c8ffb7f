"""The bundle manifest and the canonical bytes that signatures cover.

A manifest describes one bundle: what model it is, which runtime and precision it targets, every file with its
size and sha256, the integer version (it only grows), when it was made and when it expires, the eval metrics
measured by the trainer (and, optionally, the held-out evaluation set the bundle carries, `eval.heldout`, which the
device's health check scores; see `protocol.evalset`), the smoke prompts the device's health check runs, and
resource budgets.

Workflow: the fleet builds a `Manifest`, signs `canonical_bytes(manifest.to_signed())` (see `protocol.trust`),
and stores the envelope beside the files; the agent parses the envelope bytes back with `Manifest.from_signed()`
only after the signatures check out.

Identifiers that come from outside (bundle name, version, key id, sha256) are checked here with strict full-match
patterns and bounds (`check_name`, `check_version`, ...); the pydantic models of this module and of
`protocol.messages` use them through the `BundleName`, `Version`, ... field types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationError, field_validator,
    model_validator,
)

from .errors import IdentifierError, ManifestError, SlmopsError, clip

MANIFEST_SCHEMA_VERSION = 1
BUNDLE_FORMAT = "onnxruntime-genai"
# Identifier patterns: always applied with re.fullmatch (never `$`, which lets a trailing newline through).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
KEYID_RE = SHA256_RE  # a key id is the sha256 of the raw Ed25519 public key
MAX_VERSION = 2**63 - 1  # the highest version (and any counter): fits a signed 64-bit integer column
MAX_PATH_CHARS = 1024  # characters in a file path inside the bundle
MAX_PART_BYTES = 255  # bytes in one part of that path (the usual file-name limit)
METRIC_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")  # an eval metric's name, e.g. label_accuracy
MAX_EVAL_SET_BYTES = 256 * 1024  # bytes: the largest held-out evaluation set file a manifest may name
MAX_EVAL_NEW_TOKENS = 256  # tokens: the most a held-out item's answer may take
MAX_MATCH_REGEX_CHARS = 256  # characters in a held-out set's match regex
_T = TypeVar("_T")


# ---- identifiers from outside: strict full-match patterns and bounds ----------------------------------------


def check_identifier(value: object, pattern: re.Pattern[str], max_chars: int, what: str, rule: str) -> str:
    """`value` if it is a str of at most `max_chars` that `pattern` matches in full; IdentifierError otherwise."""
    if not isinstance(value, str) or len(value) > max_chars or not pattern.fullmatch(value):
        raise IdentifierError(f"{what} {clip(value)} is not valid: {rule}")
    return value


def check_name(name: object) -> str:
    """A bundle name: 1-64 chars of a-z, 0-9, '.', '_', '-', starting with a letter or digit."""
    return check_identifier(
        name, NAME_RE, 64, "bundle name", "use 1-64 chars of a-z, 0-9, '.', '_', '-' starting with a letter or digit"
    )


def check_version(version: object) -> int:
    """A bundle version: a whole number from 1 to 2**63 - 1 (a bool is not a version)."""
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version <= MAX_VERSION:
        raise IdentifierError(f"version {clip(version)} is not valid: use a whole number from 1 to {MAX_VERSION}")
    return version


def check_keyid(keyid: object) -> str:
    """A key id: 64 lowercase hex digits (the sha256 of the raw public key)."""
    return check_identifier(keyid, KEYID_RE, 64, "key id", "use the 64 lowercase hex digits of the key's sha256")


def check_sha256(digest: object) -> str:
    """A sha256 digest: 64 lowercase hex digits."""
    return check_identifier(digest, SHA256_RE, 64, "sha256", "use 64 lowercase hex digits")


def check_metric(name: object) -> str:
    """An eval metric's name: 1-64 chars of a-z, 0-9, '_', starting with a letter."""
    return check_identifier(name, METRIC_RE, 64, "metric name", "use 1-64 chars of a-z, 0-9, '_' starting with a letter")


def check_regex(pattern: object, max_chars: int = MAX_MATCH_REGEX_CHARS) -> str:
    """A regex that compiles, of at most `max_chars` characters."""
    if not isinstance(pattern, str) or len(pattern) > max_chars:
        raise ManifestError(f"regex {clip(pattern)} is not valid: use a string of at most {max_chars} chars")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # a repeat over 2**32-1; groups nested too deep
        raise ManifestError(f"regex {clip(pattern)} does not compile: {exc}") from None
    return pattern


def validated(check: Callable[[object], _T]) -> AfterValidator:
    """A pydantic validator running a protocol check (its typed error becomes the schema error's message)."""

    def run(value: object) -> _T:
        try:
            return check(value)
        except SlmopsError as exc:
            raise ValueError(str(exc)) from None

    return AfterValidator(run)


BundleName = Annotated[str, validated(check_name)]
Version = Annotated[int, Strict(), validated(check_version)]
KeyId = Annotated[str, validated(check_keyid)]
Sha256 = Annotated[str, validated(check_sha256)]
MetricName = Annotated[str, validated(check_metric)]
Count = Annotated[int, Field(ge=0, le=MAX_VERSION)]  # sizes, sequence numbers, counters: fit 63 bits
Score = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]  # a share from 0 to 1 (never a bool or str)


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
    size: Count
    sha256: Sha256

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        if len(v) > MAX_PATH_CHARS:
            raise ValueError(f"file path {clip(v)} is longer than {MAX_PATH_CHARS} chars")
        parts = v.split("/")
        if not v or v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe file path {clip(v)}: must be relative, '/'-separated, without '.' or '..'")
        if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in v):
            raise ValueError(f"file path {clip(v)} holds a control character or an unpaired surrogate")
        if any(len(p.encode()) > MAX_PART_BYTES for p in parts):
            raise ValueError(f"file path {clip(v)} has a part longer than {MAX_PART_BYTES} bytes")
        return v


class Target(_Frozen):
    """What the bundle runs on."""

    runtime: Literal["onnxruntime-genai"] = "onnxruntime-genai"
    precision: Literal["int4", "int8", "fp16", "fp32"] = "int4"
    execution_provider: str = "cpu"


class RegexMatch(_Frozen):
    """Score by label: the answer's label is what `regex` matches at the start of the stripped answer (its first
    group, or the whole match when it has none), compared with the expected label after strip and lower-case."""

    regex: Annotated[str, validated(check_regex)]


def _match_kind(value: Any) -> str:
    return "exact" if isinstance(value, str) else "regex"


# "exact": the whole answer after strip and lower-case equals the expected label after strip and lower-case; a
# {"regex": ...} object: see RegexMatch. The discriminator picks the branch, so an error names what is wrong in it.
MatchRule = Annotated[
    Union[Annotated[Literal["exact"], Tag("exact")], Annotated[RegexMatch, Tag("regex")]],
    Discriminator(_match_kind),
]


class HeldoutSet(_Frozen):
    """A small held-out evaluation set the bundle carries as one of its files (so it is verified with the bundle):
    JSON lines of items (`protocol.evalset`) the device's health check answers greedily; the share it gets right is
    reported as `metric` (name it like the trainer's metric of the same measure, so the fleet can compare the two).
    Below `min_score` the health check fails and the update rolls back; None: the score is only reported."""

    file: str = Field(min_length=1, max_length=MAX_PATH_CHARS)  # must be one of the manifest's files
    metric: MetricName
    min_score: Score | None = None
    max_new_tokens: int = Field(default=16, ge=1, le=MAX_EVAL_NEW_TOKENS)
    match: MatchRule = "exact"  # the rule for items that name none of their own


class EvalMetrics(_Frozen):
    """Metrics the trainer measured on the held-out split, e.g. {"label_accuracy": 0.93}, and the held-out set the
    device scores itself (None: the bundle carries none)."""

    dataset: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    heldout: HeldoutSet | None = None


class SmokePrompt(_Frozen):
    """A prompt the device's health check answers; `expect` is a regex the answer must match (search)."""

    prompt: str
    expect: str = r"\S"

    @field_validator("expect")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except (re.error, OverflowError, RecursionError) as exc:  # a repeat over 2**32-1; groups nested too deep
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

    name: BundleName
    version: Version
    sha256: Sha256


class Manifest(_Frozen):
    """The signed part of a bundle's envelope."""

    type: Literal["slmops-bundle"] = "slmops-bundle"
    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: BundleName
    version: Version
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

    @model_validator(mode="after")
    def _heldout_file(self) -> "Manifest":
        heldout = self.eval.heldout
        if heldout is not None:
            entry = self.file(heldout.file)
            if entry is None:
                raise ValueError(f"eval.heldout.file {clip(heldout.file)} is not one of the bundle's files")
            if entry.size > MAX_EVAL_SET_BYTES:
                raise ValueError(f"eval.heldout.file is {entry.size} bytes, over the {MAX_EVAL_SET_BYTES} byte limit")
        return self

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
    loc = ".".join(str(p) for p in e.get("loc", ()))[:80]  # an unknown key is part of loc: never echo it whole
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc or 'value'}: {str(e.get('msg'))[:300]}{more}"


def utc(ts: str | datetime) -> datetime:
    """Parse an ISO-8601 timestamp (or pass through a datetime) as an aware UTC datetime."""
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00")) if isinstance(ts, str) else ts
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
