"""Who may call the hub over HTTP: the vendor's per-customer API keys (``ck_...``, issued by the operator, stored
hashed) and the operator's admin token, both as Bearer keys through the middleware the local API uses too
(gateway/web/auth.py).

A customer key carries the scopes ``read``, ``book`` and ``customer:<id>``: the vendor API's routes need
``customer:{customer}`` of the path, so a key reaches only its own customer (403 insufficient_scope for another).
The admin token carries ``admin`` (the admin API) and ``metrics`` (GET /metrics). Without a configured admin token
those answer 403 admin_api_disabled.
"""

from __future__ import annotations

import hmac
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.hub.state import HubState
from gateway.web.auth import AuthTexts, Principal, Verdict
from gateway.web.problem import problem

ADMIN: Final = Principal("admin", "the admin token", frozenset({"admin", "metrics"}))
OPERATOR_ONLY: Final = ("/admin/", "/metrics")


def _lacking(scope: str, who: Principal) -> str:
    if scope.startswith("customer:"):
        return f"this API key belongs to another customer, not {scope.removeprefix('customer:')!r}"
    if scope in ("admin", "metrics"):
        return "this endpoint takes the hub's admin token, not a customer's API key"
    return f"this key lacks the scope {scope!r}"


TEXTS: Final = AuthTexts(
    realm="hub",
    missing="send the customer's API key (the hub's admin token for /admin and /metrics) as "
            "'Authorization: Bearer <key>'",
    invalid="the API key is not known at this hub; the operator issues keys with `gateway hub api-key CUSTOMER`",
    revoked="this API key was revoked; the operator issues keys with `gateway hub api-key CUSTOMER`",
    lacking=_lacking)


class HubKeys:
    def __init__(self, state: HubState) -> None:
        self.state = state

    async def check(self, token: str) -> Verdict:
        admin = self.state.settings.admin_token
        if admin is not None and hmac.compare_digest(token.encode(), admin.reveal().encode()):
            return Verdict(ADMIN)
        customer = await self.state.read(self.state.store.customer_for_api_key, token)
        if customer is None:
            return Verdict(None, "unknown")
        return Verdict(Principal(f"customer:{customer}", customer,
                                 frozenset({"read", "book", f"customer:{customer}"})))


def admin_gate(state: HubState) -> Middleware:
    """403 admin_api_disabled for the operator's endpoints while the hub has no admin token."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if state.settings.admin_token is None and request.path.startswith(OPERATOR_ONLY):
            raise problem(403, "admin_api_disabled", "the admin API is off: start the hub with an admin token "
                                                     "(gateway hub serve --admin-token-env VAR), or use the "
                                                     "`gateway hub` commands on its data directory")
        return await handler(request)
    return middleware
