"""A small Microsoft Graph and Entra ID token endpoint in the test's own process, over HTTPS (tests/test_graph_client.py
and the proxy test in tests/test_graph_gateway.py): msal for real against it, answers scripted per path."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from gateway.sources.graph.settings import GraphSettings

TENANT, CLIENT, SECRET = "contoso.onmicrosoft.com", "11111111-2222-3333-4444-555555555555", "s3cr3t-value~xyz"


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Stub:
    """Entra ID's token endpoint and a few Graph routes; ``answers`` scripts a path's next answers (a body of bytes is
    sent as it is)."""

    base: str = ""
    secret_expired: bool = False
    certificate: x509.Certificate | None = None
    token_requests: int = 0
    tokens: set[str] = field(default_factory=set)
    seen: list[tuple[float, str, str]] = field(default_factory=list)  # (time, method, path)
    answers: dict[str, list[tuple[int, Any, dict[str, str]]]] = field(default_factory=dict)
    delay: float = 0.0
    in_flight: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)

    async def openid(self, request: web.Request) -> web.Response:
        t = request.match_info["tenant"]
        return web.json_response({"authorization_endpoint": f"{self.base}/{t}/oauth2/v2.0/authorize",
                                  "token_endpoint": f"{self.base}/{t}/oauth2/v2.0/token",
                                  "issuer": f"{self.base}/{t}/v2.0"})

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("client_id") != CLIENT or form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unauthorized_client"}, status=400)
        if "client_assertion" in form:
            ok = self._assertion_ok(str(form["client_assertion"]))
        else:
            ok = form.get("client_secret") == SECRET and not self.secret_expired
        if not ok:
            code = "AADSTS7000222: The provided client secret keys for app '{}' are expired." if self.secret_expired \
                else "AADSTS7000215: Invalid client secret provided."
            return web.json_response({"error": "invalid_client", "error_description": code.format(CLIENT),
                                      "error_codes": [7000222]}, status=401)
        token = f"token-{self.token_requests}"
        self.tokens.add(token)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "access_token": token})

    def _assertion_ok(self, assertion: str) -> bool:
        if self.certificate is None:
            return False
        head, body, signature = assertion.split(".")
        header = json.loads(unb64url(head))
        said = {k: unb64url(str(header[k]).replace("+", "-").replace("/", "_").rstrip("="))
                for k in ("x5t", "x5t#S256") if k in header}
        if said.get("x5t") != self.certificate.fingerprint(hashes.SHA1()) and \
                said.get("x5t#S256") != self.certificate.fingerprint(hashes.SHA256()):
            return False
        key: Any = self.certificate.public_key()
        pad = padding.PSS(padding.MGF1(hashes.SHA256()), 32) if header["alg"] == "PS256" else padding.PKCS1v15()
        try:
            key.verify(unb64url(signature), f"{head}.{body}".encode(), pad, hashes.SHA256())
        except Exception:
            return False
        return bool(json.loads(unb64url(body)).get("sub") == CLIENT)

    async def graph(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.tokens:
            return web.json_response({"error": {"code": "InvalidAuthenticationToken"}}, status=401)
        path = request.path.removeprefix("/v1.0")
        mailbox = path.split("/")[2] if path.startswith("/users/") else "-"
        self.seen.append((time.monotonic(), request.method, path))
        self.in_flight[mailbox] = self.in_flight.get(mailbox, 0) + 1
        self.most[mailbox] = max(self.most.get(mailbox, 0), self.in_flight[mailbox])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)  # the server's own pace, so that requests overlap
            script = self.answers.get(path)
            status, body, headers = script.pop(0) if script else (200, {"id": "x"}, {})
            if isinstance(body, bytes):  # (an answer's bytes as they are, JSON or not)
                return web.Response(body=body, status=status, headers=headers, content_type="application/json")
            return web.json_response(body, status=status, headers=headers)
        finally:
            self.in_flight[mailbox] -= 1


async def serve_stub(pki: Any) -> AsyncIterator[Stub]:
    s = Stub()
    app = web.Application()
    app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", s.openid)
    app.router.add_post("/{tenant}/oauth2/v2.0/token", s.token)
    app.router.add_route("*", "/v1.0/{tail:.*}", s.graph)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context())
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    s.base = f"https://127.0.0.1:{port}"
    yield s
    await runner.cleanup()
    await asyncio.sleep(0.1)  # the server's TLS transports finish closing


def settings(stub: Stub, pki: Any, **kw: Any) -> GraphSettings:
    return GraphSettings(tenant_id=TENANT, client_id=CLIENT, credential=kw.pop("credential", "client_secret"),
                         authority_host=stub.base, graph_url=f"{stub.base}/v1.0", ca_bundle=str(pki.ca_file),
                         timeout=10, back_off=0.05, **kw)


def rsa_certificate(days: int = 30) -> tuple[str, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange-gateway app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
    return pem.decode(), cert
