"""One error tree for the whole gateway, grouped by what the caller should do.

    GatewayError
    ├── ConfigError              fatal: the configuration is wrong; fix it and restart
    ├── AuthError                stop and ask: credentials or rights are wrong; retrying will not help
    │   └── ImpersonationDenied      the service account may not act for this mailbox
    ├── NotFound                 the mailbox, folder or item does not exist (any more)
    ├── TransientError           retry later, with back-off
    │   ├── Throttled                the server asked us to wait ``back_off`` seconds
    │   └── Unavailable              a peer failed for now (a connection reset, a timeout, a store down)
    │       └── Unreachable              the endpoint cannot be used at all, for any mailbox: no connection
    │                                    (cannot_connect), unknown host (unknown_host), TLS refused (tls_error),
    │                                    an HTTP error status (http_error)
    ├── PreconditionFailed       re-plan: the state changed under us (stale change key, invalid sync state)
    │   └── SyncStateInvalid         the server rejected our sync state; resync from scratch
    └── ProtocolError            dead-letter: a peer sent something malformed or unexpected

Every error carries a stable ``key`` (for logs, metrics and status pages) and a ``remedy`` that tells a
person what to do. Third-party exceptions are translated into this tree at the adapter boundary.

Some failures are the same for every mailbox of an account (``shared``): refused credentials, an unreachable
server, throttling. One attempt tells the answer for all; callers stop every room behind it and retry with one.
"""

from __future__ import annotations


class GatewayError(Exception):
    key = "error"
    remedy = ""

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


class ImpersonationDenied(AuthError):
    key = "impersonation_denied"
    remedy = "grant the service account ApplicationImpersonation with a scope that includes this mailbox"


class NotFound(GatewayError):
    key = "not_found"


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


def is_shared(e: BaseException) -> bool:
    """True for a failure that every mailbox of the account meets alike: the account's own credentials refused (a
    plain AuthError, not a right on one mailbox), the server unreachable, or throttling."""
    if type(e) is AuthError:
        return e.key == AuthError.key
    return isinstance(e, Unreachable | Throttled)


class PreconditionFailed(GatewayError):
    key = "precondition_failed"


class SyncStateInvalid(PreconditionFailed):
    key = "sync_state_invalid"
    remedy = "a full resync of the folder runs automatically"


class ProtocolError(GatewayError):
    key = "protocol_error"

    def __init__(self, message: str, *, key: str | None = None, remedy: str | None = None,
                 command_key: str | None = None) -> None:
        super().__init__(message, key=key, remedy=remedy)
        self.command_key = command_key  # the idempotency key of the bad command, when it had a usable one
