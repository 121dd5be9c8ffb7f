"""One family of typed errors shared by every slmops package.

Two branches, after python-tuf: `BundleError` for bad content (a device must refuse it and keep what it has)
and `TransportError` for trouble moving bytes (worth a retry). `MessageError` covers malformed MQTT payloads,
`IdentifierError` an id, name or version from outside that fails its strict pattern or bound.
Every error carries a `code` (a stable, machine-readable word used in status reports) and a message that says
what went wrong and what to do. `clip` and `one_line` render untrusted values and errors short enough for a
message or a log line.
"""

from __future__ import annotations


class SlmopsError(Exception):
    """Base class of every error slmops raises on purpose."""

    code = "error"


class ConfigError(SlmopsError):
    """A setting, key file or path given by the user is missing or unusable."""

    code = "config"


class MessageError(SlmopsError):
    """An MQTT payload is not valid JSON or does not match its schema."""

    code = "bad_message"


class TopicError(SlmopsError):
    """A topic string does not follow the slmops topic layout."""

    code = "bad_topic"


class IdentifierError(SlmopsError):
    """An identifier from outside (deployment id, bundle name, version, key id) is malformed or out of range."""

    code = "bad_identifier"


class BundleError(SlmopsError):
    """A bundle's content is not acceptable; the device must refuse it."""

    code = "bad_bundle"


class ManifestError(BundleError):
    """The manifest is missing, not JSON, or does not match the manifest schema."""

    code = "bad_manifest"


class SignatureError(BundleError):
    """A manifest, trust root or command is not signed by enough trusted keys, or a signature does not match."""

    code = "bad_signature"


class LengthOrHashMismatchError(BundleError):
    """A file's size or sha256 differs from what the signed manifest says."""

    code = "hash_mismatch"


class UnexpectedFileError(BundleError):
    """The bundle holds a file the manifest does not name, or a path that escapes the bundle."""

    code = "unexpected_file"


class UnsafePathError(UnexpectedFileError):
    """A bundle member's path is outside model/, absolute, or has empty, '.' or '..' parts."""

    code = "unsafe_path"


class DuplicateFileError(UnexpectedFileError):
    """The bundle holds the same file twice."""

    code = "duplicate_file"


class NotRegularFileError(BundleError):
    """A bundle member is not a plain file: a link, device, fifo, directory, sparse file or GNU long-name record."""

    code = "not_regular_file"


class BadHeaderError(BundleError):
    """A bundle member's tar header is damaged, or its PAX header changes its size or path or adds other fields."""

    code = "bad_header"


class MissingFileError(BundleError):
    """A file the manifest names is absent from the bundle."""

    code = "missing_file"


class BadVersionNumberError(BundleError):
    """A bundle's version is older than one the device trusted, or a new root's is not the trusted one plus 1."""

    code = "bad_version"


class ExpiredMetadataError(BundleError):
    """The signed manifest or trust root is past its expiry time."""

    code = "expired"


class IncompatibleTargetError(BundleError):
    """The bundle targets a runtime, format or execution provider this device cannot run."""

    code = "incompatible"


class VersionReusedError(BundleError):
    """A bundle reuses the name and version of one this device already trusted, with different content."""

    code = "version_reused"


class RootError(BundleError):
    """Trust root metadata is malformed, breaks a rule of the root format, or brings back a revoked key."""

    code = "bad_root"


class EvalSetError(BundleError):
    """A bundle's held-out evaluation set is malformed: not JSON lines, too many items, an item out of bounds."""

    code = "bad_eval_set"


class TransportError(SlmopsError):
    """Bytes could not be moved (network down, server error); retrying may help."""

    code = "transport"


class DownloadError(TransportError):
    """A download failed, was cut short, or exceeded its size cap."""

    code = "download"


class DownloadTooSlowError(DownloadError):
    """A download's average rate over the device's window stayed under its minimum rate."""

    code = "download_too_slow"


class DownloadDeadlineError(DownloadError):
    """A download did not finish within the device's overall download deadline."""

    code = "download_deadline"


class StorageError(SlmopsError):
    """The device's disk refused a read or write (an I/O error); nothing was switched."""

    code = "io_error"


class DiskFullError(StorageError):
    """The device's disk (or the agent's quota on it) is full."""

    code = "disk_full"


class ReadOnlyError(StorageError):
    """The device's data folder is on a read-only (or write-protected) file system."""

    code = "read_only"


class StateDamagedError(SlmopsError):
    """A state file of the agent was empty or unreadable and was rebuilt from what is on disk."""

    code = "state_damaged"


class ModelDamagedError(SlmopsError):
    """An installed model's files are missing or differ from its verified manifest."""

    code = "model_damaged"


class UpdateCancelledError(SlmopsError):
    """The fleet cancelled the deployment before its install began; nothing was installed."""

    code = "cancelled"


class SupersededError(UpdateCancelledError):
    """A newer deployment of the same bundle arrived while this one waited; it was not run."""

    code = "superseded"


class HealthCheckError(SlmopsError):
    """A newly installed model failed its health check (load, smoke prompt, time limit)."""

    code = "health_check"


class EvalBelowMinimumError(HealthCheckError):
    """A newly installed model scored its bundle's held-out evaluation set below the bundle's own minimum."""

    code = "eval_below_minimum"

    def __init__(self, message: str, score: object = None) -> None:
        super().__init__(message)
        self.score = score  # the aggregate the device measured (a protocol.messages.EvalScore), for its report


def clip(value: object, limit: int = 40) -> str:
    """A short, safe rendering of an untrusted value for error messages and logs."""
    if isinstance(value, str):
        return repr(value[:limit]) + (f"... ({len(value)} chars)" if len(value) > limit else "")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
    return f"<{type(value).__name__}>"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's class and message on one printable line of at most about `limit` chars, for logs about
    untrusted input (a message may quote part of a hostile payload; it never gets to fill the log)."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break the logging of the error
        text = "(message unavailable)"
    line = f"{type(exc).__name__}: {text[:limit]}".encode("unicode_escape").decode("ascii")
    return line[:limit] + ("..." if len(text) > limit or len(line) > limit else "")
