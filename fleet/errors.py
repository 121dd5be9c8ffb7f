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


class BrokerAccountsError(FleetError):
    """The broker refused, or did not answer, a change to its accounts (enrolling or revoking a device)."""

    code = "broker_accounts"
