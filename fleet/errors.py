"""Fleet-side errors on top of protocol.errors; the HTTP layer maps each family to one status code."""

from __future__ import annotations

from protocol.errors import SlmopsError


class FleetError(SlmopsError):
    """A fleet operation cannot be done as asked."""

    code = "fleet"


class NotFoundError(FleetError):
    """A device, bundle or deployment the request names does not exist."""

    code = "not_found"


class ConflictError(FleetError):
    """The request clashes with what the fleet already holds (e.g. same bundle version, different bytes)."""

    code = "conflict"


class TooLargeError(FleetError):
    """An upload is larger than the fleet accepts."""

    code = "too_large"


class PkiError(FleetError):
    """The project CA folder cannot do what was asked: missing or damaged files, a bad name, or a validity the CA
    cannot give."""

    code = "pki"


class UnauthenticatedError(FleetError):
    """No API token, or one the fleet does not know (or has revoked): send a valid `Authorization: Bearer` token."""

    code = "unauthenticated"


class ForbiddenError(FleetError):
    """The caller is known but its role may not do this."""

    code = "forbidden"


class RateLimitedError(FleetError):
    """Too many failed authentication attempts from one address; wait `retry_after_s` seconds."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EnrolmentError(FleetError):
    """An enrolment token is unknown, already used, expired, or pinned to another device id."""

    code = "enrolment_refused"


class DeviceRevokedError(FleetError):
    """The device was revoked; an admin must reinstate it before it can enrol again."""

    code = "device_revoked"


class BrokerAccountsError(FleetError):
    """The MQTT broker did not take the account change (mosquitto dynamic security); retry the request."""

    code = "broker_accounts"


class GateError(FleetError):
    """A bundle misses a rollout's quality gate (its eval metrics, or the bundle it replaces)."""

    code = "gate_failed"


class RolloutStateError(ConflictError):
    """A rollout cannot take that step from the state it is in (e.g. resume a finished rollout)."""

    code = "rollout_state"


class TelemetryQueryError(FleetError):
    """A telemetry query asks for a window, step or time the fleet does not serve (bad ISO time, step out of range,
    too many points)."""

    code = "bad_telemetry_query"


class SchemaError(FleetError):
    """The database's schema cannot be brought to this fleet's: it is at a revision this fleet does not know (a newer
    slmops migrated it), or it holds an older fleet's tables without the columns revision 0001 expects."""

    code = "schema"
