"""The operator's API (``/admin/v1/...``, the admin token): customers, enrollment tokens, API keys, gateways,
revocation, webhooks; and GET /metrics (docs/relay-protocol.md, sections 12 and 16)."""

from __future__ import annotations

from datetime import timedelta
from typing import Final
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.hub.state import HubState
from gateway.hub.tunnels import Tunnels
from gateway.web.params import json_object
from gateway.web.problem import problem

log = structlog.get_logger(__name__)

MAX_TOKEN_TTL: Final = timedelta(days=30)


class AdminApi:
    def __init__(self, state: HubState, tunnels: Tunnels) -> None:
        self.state = state
        self.tunnels = tunnels

    async def list_customers(self, request: web.Request) -> web.Response:
        customers = await self.state.read(self.state.store.customers)
        return web.json_response({"customers": [{"id": c.id, "name": c.name, "created_at": c.created_at,
                                                 "last_seq": c.last_seq} for c in customers]})

    async def add_customer(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        customer_id, name = body.get("id"), body.get("name")
        if not isinstance(customer_id, str) or (name is not None and not isinstance(name, str)):
            raise problem(400, "invalid_request", "send {\"id\": \"contoso\", \"name\": \"Contoso Ltd\"}")
        c = await self.state.write(self.state.store.add_customer, customer_id, name)
        log.info("hub.customer_added", customer=c.id)
        return web.json_response({"id": c.id, "name": c.name, "created_at": c.created_at}, status=201)

    async def enrollment_token(self, request: web.Request) -> web.Response:
        body = await json_object(request, optional=True)
        ttl = body.get("ttl_seconds", self.state.settings.token_ttl)
        if type(ttl) not in (int, float) or not 0 < ttl <= MAX_TOKEN_TTL.total_seconds():
            raise problem(400, "invalid_ttl", f"ttl_seconds must be a number of seconds between 1 and "
                                              f"{int(MAX_TOKEN_TTL.total_seconds())}")
        customer = request.match_info["customer"]
        token, expires = await self.state.write(self.state.store.issue_token, customer, timedelta(seconds=ttl))
        log.info("hub.token_issued", customer=customer, expires_at=expires)
        return web.json_response({"token": token, "expires_at": expires, "customer": customer}, status=201)

    async def api_key(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        key = await self.state.write(self.state.store.issue_api_key, customer)
        log.info("hub.api_key_issued", customer=customer)
        return web.json_response({"key": key, "customer": customer}, status=201)

    async def list_gateways(self, request: web.Request) -> web.Response:
        records = await self.state.read(self.state.store.gateways)
        out = []
        for g in records:
            doc = g.to_json()
            doc["connected"] = g.id in self.state.sessions
            out.append(doc)
        return web.json_response({"gateways": out})

    async def revoke(self, request: web.Request) -> web.Response:
        gateway_id = request.match_info["gateway"]
        at = await self.state.write(self.state.store.revoke, gateway_id)
        log.warning("hub.gateway_revoked", gateway_id=gateway_id)
        await self.tunnels.end_revoked(gateway_id)
        return web.json_response({"id": gateway_id, "revoked_at": at})

    async def set_webhook(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        body = await json_object(request)
        url = body.get("url")
        if url is not None and (not isinstance(url, str) or urlsplit(url).scheme != "https"
                                or not urlsplit(url).hostname):
            raise problem(400, "invalid_url", "url must be an https:// address (or null to remove the webhook)")
        secret = await self.state.write(self.state.store.set_webhook, customer, url)
        assert self.state.webhooks is not None
        await self.state.webhooks.reconfigure(customer)
        log.info("hub.webhook_set", customer=customer, url=url)
        return web.json_response({"url": url, "secret": secret})

    async def get_webhook(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        hook = await self.state.read(self.state.store.webhook, customer)
        if hook is None:
            raise problem(404, "no_webhook", f"{customer!r} has no webhook; set one with PUT on this address")
        return web.json_response({"url": hook.url, "cursor": hook.cursor, "error": hook.error,
                                  "failing_since": hook.failing_since})

    async def prometheus(self, request: web.Request) -> web.Response:
        """GET /metrics: the admin token's, like the admin API (the hub faces the internet)."""
        body: bytes = await self.state.read(self.state.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

