"""Refusals the domain gives, each with a stable reason code. The HTTP layer reads the class for the status.

`Refused` subclasses name what kind of refusal it is, not an HTTP status; `miniapp_api.errors` maps each kind to
one status, so a newcomer finds the code (here), the rule that raises it (the domain module) and the status (there).
"""
from __future__ import annotations


class DomainError(Exception):
    """A request the domain refuses: a snake_case `code`, a human `message` and machine-readable `details`."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class Invalid(DomainError):
    """The input is wrong whatever the state (an unknown product, a bad value)."""


class Unauthenticated(DomainError):
    """No valid identity: a bad, expired or revoked token, or a login WeChat refused."""


class NotFound(DomainError):
    """No such thing — or it belongs to someone else, which answers exactly the same."""


class Forbidden(DomainError):
    """Allowed only after something the user has not done yet (consent)."""


class Conflict(DomainError):
    """Not possible in the current state (an avatar not ready, an order already open)."""


class Gone(DomainError):
    """It existed but is over for good (an album's invitation expired or closed)."""


class PaymentRequired(DomainError):
    """Needs something paid for that is used up (render credits)."""


class TooLarge(DomainError):
    """Over a size limit."""


class UnsupportedMedia(DomainError):
    """A kind of upload the service does not take."""


class Unavailable(DomainError):
    """A dependency (WeChat, a lock held elsewhere) cannot answer now; the same call may succeed later."""


class UpstreamFailed(DomainError):
    """A provider this request called (WeChat Pay's prepay) failed it; nothing happened, and trying again may work."""


def not_found(kind: str) -> NotFound:
    """Ids of other users answer exactly like ids that never existed."""
    return NotFound(f"{kind}_not_found", f"No such {kind}.")
