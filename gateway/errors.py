"""One error tree for the whole gateway, grouped by what the caller should do.

    GatewayError
    ├── ConfigError              fatal: the configuration is wrong; fix it and restart
    ├── AuthError                stop and ask: the account's own credentials are refused (invalid_auth)
    │   ├── AccountLocked            the directory has locked the service account out (account_locked)
    │   ├── AccessDenied             the account lacks a right on this mailbox (auth_required)
    │   └── ImpersonationDenied      the service account may not act for this mailbox
    ├── NotFound                 the mailbox, folder or item does not exist (any more)
    │   ├── MailboxNotFound          no mailbox at this address (mailbox_not_found)
    │   └── RoomUnknown              no source (or server) knows the room a command names (room_unknown)
    ├── TransientError           retry later, with back-off
    │   ├── Throttled                the server asked us to wait ``back_off`` seconds
    │   └── Unavailable              a peer failed for now: no connection (cannot_connect), a store down
    │       ├── RequestFailed            the server is there, one request failed for now (exchange_error)
    │       │   └── MailboxThrottled         throttled for one mailbox only (Graph): that room waits (throttled)
    │       └── Unreachable              the endpoint cannot be used at all, for any mailbox: no connection
    │           │                        (cannot_connect)
    │           ├── UnknownHost              its host name does not resolve (unknown_host)
    │           ├── TlsError                 TLS with it failed (tls_error)
    │           └── HttpError                it answers, but with an HTTP error or not as the protocol (http_error)
    ├── PreconditionFailed       re-plan: the state changed under us (stale change key, invalid sync state)
    │   ├── SyncStateInvalid         the server rejected our sync state; resync from scratch
    │   └── RoomIsOrganizer          the room organizes the meeting, so it has nobody to decline to
    └── ProtocolError            dead-letter: a peer sent something malformed or unexpected

Every error carries a stable ``key`` (for logs, metrics, room states and API bodies) and a ``remedy`` that tells a
person what to do. Code decides by class (``except MailboxNotFound``), never by comparing keys: a key names a
failure, it does not sort it. A raise site may pass its own ``key`` for a finer name in the logs (the hub's
``customer_unknown``, the relay's ``hub_closed``) where nothing decides by it. Modules add leaves for decisions of
their own (relay.enroll's EnrollmentRefused and AlreadyEnrolled, the hub store's). Third-party exceptions are
translated into this tree at the adapter boundary.

Some failures are the same for every mailbox of an account (``shared``): refused credentials, an unreachable
server, throttling. One attempt tells the answer for all; callers stop every room behind it and retry with one.
"""

from __future__ import annotations


class GatewayError(Exception):
    key = "error"
    remedy = ""
    # The remedy names the fix for this very case (an access policy's PowerShell, a Graph app's secret), so a room
    # in the state it causes shows it instead of the state's general remedy (model.ROOM_STATES).
    own_remedy = False

    def __init__(self, message: str, *, key: str | None = None, remedy: str | None = None) -> None:
        super().__init__(message)
        if key is not None:
            self.key = key
        if remedy is not None:
            self.remedy = remedy

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.remedy})" if self.remedy else text


class ConfigError(GatewayError):
    key = "invalid_config"
    remedy = "fix the configuration and restart"


class AuthError(GatewayError):
    key = "invalid_auth"
    remedy = "check the service account's user name and password"


class AccountLocked(AuthError):
    key = "account_locked"
    remedy = "unlock the account in Active Directory and check its password"


class AccessDenied(AuthError):
    key = "auth_required"
    remedy = "check the account's rights on this mailbox"


class ImpersonationDenied(AuthError):
    key = "impersonation_denied"
    remedy = "grant the service account ApplicationImpersonation with a scope that includes this mailbox"


class NotFound(GatewayError):
    key = "not_found"


class MailboxNotFound(NotFound):
    key = "mailbox_not_found"
    remedy = "check the room's address in the configuration"


class RoomUnknown(NotFound):
    key = "room_unknown"
    remedy = "check the room's address"


class TransientError(GatewayError):
    key = "transient"
    remedy = "retried automatically"


class Throttled(TransientError):
    key = "throttled"

    def __init__(self, message: str, *, back_off: float | None = None, **kw: str) -> None:
        super().__init__(message, key=kw.get("key"), remedy=kw.get("remedy"))
        self.back_off = back_off


class Unavailable(TransientError):
    key = "cannot_connect"
    remedy = "check that the server is up and reachable from the gateway"


class RequestFailed(Unavailable):
    """The server is there and answered (or began to): only this request failed, for now. Not shared: the next
    mailbox's request may well pass."""

    key = "exchange_error"
    remedy = "retried automatically; if it persists, check the server's health"


class MailboxThrottled(RequestFailed):
    """The server throttles requests for one mailbox (Graph counts per app *and mailbox*): that room waits; the
    others are not held up, so it is not shared as Throttled is."""

    key = "throttled"
    remedy = "nothing to do: the room is read again after the back-off; if it persists, another app may share the " \
             "mailbox's budget"
    own_remedy = True  # not the throttled state's general words (the service account's budget)


class Unreachable(Unavailable):
    """The endpoint itself fails: every request of the account would fail alike. ``host`` and ``status`` (the HTTP
    status, when there was an answer) are the detail a person needs."""

    key = "cannot_connect"
    remedy = "check that the server is up and reachable from the gateway"

    def __init__(self, message: str, *, key: str | None = None, remedy: str | None = None, host: str = "",
                 status: int | None = None) -> None:
        super().__init__(message, key=key, remedy=remedy)
        self.host = host
        self.status = status


class UnknownHost(Unreachable):
    key = "unknown_host"
    remedy = "check the host name in the configuration and the gateway's DNS"


class TlsError(Unreachable):
    key = "tls_error"
    remedy = "check the server's certificate, or give the CA that issued it in the configuration"


class HttpError(Unreachable):
    key = "http_error"
    remedy = "check the server's address in the configuration and what answers there"


def is_shared(e: BaseException) -> bool:
    """True for a failure that every mailbox of the account meets alike: the account's own credentials refused or
    the account locked out (not a right on one mailbox, not impersonation), the server unreachable, or throttling.
    Such a failure costs one probe, not one request per room: a locked account must not be hammered either."""
    return type(e) in (AuthError, AccountLocked) or isinstance(e, Unreachable | Throttled)


class PreconditionFailed(GatewayError):
    key = "precondition_failed"


class SyncStateInvalid(PreconditionFailed):
    key = "sync_state_invalid"
    remedy = "a full resync of the folder runs automatically"


class RoomIsOrganizer(PreconditionFailed):
    key = "room_is_organizer"


class ProtocolError(GatewayError):
    key = "protocol_error"

    def __init__(self, message: str, *, key: str | None = None, remedy: str | None = None,
                 command_key: str | None = None) -> None:
        super().__init__(message, key=key, remedy=remedy)
        self.command_key = command_key  # the idempotency key of the bad command, when it had a usable one
