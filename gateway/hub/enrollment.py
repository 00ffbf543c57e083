"""POST /v1/enroll: a single-use enrollment token and a gateway's own Ed25519 public key, signed by the private key
to prove possession, become a gateway identity (docs/relay-protocol.md, section 3)."""

from __future__ import annotations

from urllib.parse import urlsplit

import structlog
from aiohttp import web

from gateway.hub.messages import raw_key, verified
from gateway.hub.state import HubState
from gateway.relay import protocol
from gateway.web.params import json_object
from gateway.web.problem import problem

log = structlog.get_logger(__name__)


class Enrollment:
    def __init__(self, state: HubState) -> None:
        self.state = state

    async def enroll(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        token, public_key, name, signature = (body.get(k) for k in ("token", "public_key", "name", "signature"))
        if not isinstance(token, str) or not 1 <= len(token) <= 512:
            raise problem(400, "invalid_request", "'token' (the enrollment token) is required")
        if not isinstance(public_key, str) or not isinstance(signature, str):
            raise problem(400, "invalid_request", "'public_key' and 'signature' (base64url) are required")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise problem(400, "invalid_request", "'name' must be a string of at most 200 characters")
        raw = raw_key(public_key)
        if raw is None:
            raise problem(400, "invalid_request", "'public_key' must be a base64url raw 32-byte Ed25519 public key")
        if not verified(raw, signature, protocol.signed_enrollment(token, public_key)):
            raise problem(400, "bad_signature", "the signature does not verify with the public key: sign "
                                                "signed_enrollment(token, public_key) with the new private key")
        key_id = protocol.key_id_for(raw)
        enrolled = await self.state.write(self.state.store.enroll, token, raw, key_id, name or "gateway")
        log.info("hub.gateway_enrolled", gateway_id=enrolled.gateway_id, customer=enrolled.customer, key_id=key_id,
                 name=name)
        return web.json_response({"gateway_id": enrolled.gateway_id, "customer": enrolled.customer,
                                  "key_id": key_id, "tunnel_url": self.tunnel_url(request)}, status=201)

    def tunnel_url(self, request: web.Request) -> str:
        base = self.state.settings.public_url or f"{request.scheme}://{request.host}"
        parts = urlsplit(base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{protocol.TUNNEL_PATH}"
