"""One error tree for the whole gateway, grouped by what the caller should do.

    GatewayError
    ├── ConfigError              fatal: the configuration is wrong; fix it and restart
    ├── AuthError                stop and ask: credentials or rights are wrong; retrying will not help
    │   └── ImpersonationDenied      the service account may not act for this mailbox
    ├── NotFound                 the mailbox, folder or item does not exist (any more)
    ├── TransientError           retry later, with back-off
    │   ├── Throttled                the server asked us to wait ``back_off`` seconds
    │   └── Unavailable              cannot connect, 5xx, connection reset
    ├── PreconditionFailed       re-plan: the state changed under us (stale change key, invalid sync state)
    │   └── SyncStateInvalid         the server rejected our sync state; resync from scratch
    └── ProtocolError            dead-letter: a peer sent something malformed or unexpected

Every error carries a stable ``key`` (for logs, metrics and status pages) and a ``remedy`` that tells a
person what to do. Third-party exceptions are translated into this tree at the adapter boundary.
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
