"""Entra ID's side of client credentials, as msal uses it: OpenID discovery and the v2.0 token endpoint.

An application is registered with a client secret and any number of certificates. A certificate assertion is an
RS256 (``x5t``) or PS256 (``x5t#S256``) JWT whose signature is checked against the registered certificate's public
key, with ``aud`` the token endpoint, ``iss`` = ``sub`` = the client id and a live ``exp``. Access tokens are opaque
random strings with ``expires_in``; Graph routes look them up. Errors carry Entra's AADSTS codes and shape.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

GRAPH_RESOURCE = "https://graph.microsoft.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class TokenError(Exception):
    """An answer of the token endpoint that is not a token: ``{"error", "error_description", "error_codes"...}``."""

    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(f"AADSTS{aadsts}: {description}")
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def body(self) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {"error": self.error,
                "error_description": f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace} "
                                     f"Correlation ID: {correlation} Timestamp: {stamp}",
                "error_codes": [self.aadsts], "timestamp": stamp, "trace_id": trace, "correlation_id": correlation,
                "error_uri": f"https://login.microsoftonline.com/error?code={self.aadsts}"}


def thumbprints(cert_pem: bytes) -> tuple[str, str]:
    """(x5t, x5t#S256) of a certificate: base64url of its SHA-1 and SHA-256 fingerprints, as JWT headers carry."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return (_b64url(cert.fingerprint(hashes.SHA1())),  # x5t is SHA-1 by definition (RFC 7515)
            _b64url(cert.fingerprint(hashes.SHA256())))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class AppRegistration:
    """One application (service principal) of the tenant with its credentials."""

    client_id: str
    client_secret: str
    secret_expired: bool = False
    certificates: dict[str, bytes] = field(default_factory=dict)  # x5t or x5t#S256 -> certificate PEM

    def add_certificate(self, cert_pem: bytes) -> None:
        for print_ in thumbprints(cert_pem):
            self.certificates[print_] = cert_pem

    def remove_certificates(self) -> None:
        self.certificates.clear()


@dataclass
class AccessToken:
    client_id: str
    expires_at: float  # time.monotonic()


class TokenService:
    """The tenant's token issuer: registrations, issued access tokens, and the two HTTP endpoints."""

    def __init__(self, tenant_id: str, app: AppRegistration, lifetime: int = 3599) -> None:
        self.tenant_id = tenant_id
        self.apps: dict[str, AppRegistration] = {app.client_id: app}
        self.lifetime = lifetime
        self.tokens: dict[str, AccessToken] = {}
        self.issued = 0  # tokens handed out (a client that caches them asks rarely)
        self.base_url = ""  # https://host:port, set once the server listens

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.openid_configuration)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)

    # -- the HTTP face -----------------------------------------------------------------------------------
    async def openid_configuration(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant.lower() not in (self.tenant_id, "organizations", "common"):
            return web.json_response(TokenError(400, "invalid_tenant", 90002,
                                                f"Tenant '{tenant}' not found. Check to make sure you have the "
                                                "correct tenant ID and are signing into the correct cloud.").body(),
                                     status=400)
        base = f"{self.base_url}/{self.tenant_id}"
        return web.json_response({
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{self.base_url}/{self.tenant_id}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        })

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            if request.match_info["tenant"].lower() != self.tenant_id:
                raise TokenError(400, "invalid_request", 90002,
                                 f"Tenant '{request.match_info['tenant']}' not found.")
            answer = self.issue({k: str(v) for k, v in form.items()}, f"{self.base_url}{request.path}")
        except TokenError as e:
            return web.json_response(e.body(), status=e.status)
        return web.json_response(answer, headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    # -- the decision ------------------------------------------------------------------------------------
    def issue(self, form: dict[str, str], endpoint: str) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise TokenError(400, "unsupported_grant_type", 70003,
                             "The app requested an unsupported grant type 'client_credentials' is the one served.")
        client_id = form.get("client_id", "")
        app = self.apps.get(client_id)
        if app is None:
            raise TokenError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.tenant_id}'.")
        scope = form.get("scope", "")
        scopes = scope.split()
        if not scopes or any(s.rstrip("/") not in (f"{GRAPH_RESOURCE}/.default", f"{self.base_url}/.default")
                             for s in scopes):
            raise TokenError(400, "invalid_scope", 1002012,
                             f"The provided value for scope {scope} is not valid. Client credential flows must have "
                             "a scope value with /.default suffixed to the resource identifier "
                             "(application ID URI).")
        if "client_assertion" in form:
            self._check_assertion(app, form.get("client_assertion_type", ""), form["client_assertion"], endpoint)
        elif "client_secret" in form:
            self._check_secret(app, form["client_secret"])
        else:
            raise TokenError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or "
                             "'client_secret'.")
        token = secrets.token_urlsafe(48)
        self.tokens[token] = AccessToken(client_id, time.monotonic() + self.lifetime)
        self.issued += 1
        return {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                "access_token": token}

    def _check_secret(self, app: AppRegistration, secret: str) -> None:
        if not secrets.compare_digest(secret, app.client_secret):
            raise TokenError(401, "invalid_client", 7000215,
                             "Invalid client secret provided. Ensure the secret being sent in the request is the "
                             f"client secret value, not the client secret ID, for a secret added to app "
                             f"'{app.client_id}'.")
        if app.secret_expired:
            raise TokenError(401, "invalid_client", 7000222,
                             f"The provided client secret keys for app '{app.client_id}' are expired. Visit the "
                             "Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or "
                             "consider using certificate credentials for added security: https://aka.ms/certCreds.")

    def _check_assertion(self, app: AppRegistration, kind: str, assertion: str, endpoint: str) -> None:
        if kind != ASSERTION_TYPE:
            raise TokenError(400, "invalid_request", 50027, f"Invalid client_assertion_type '{kind}'.")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as e:
            raise TokenError(401, "invalid_client", 50027, f"JWT token is invalid or malformed: {e}.") from e
        print_ = str(header.get("x5t#S256") or header.get("x5t") or "").rstrip("=")  # msal pads, RFC 7515 does not
        cert_pem = app.certificates.get(print_)
        if cert_pem is None:
            raise TokenError(401, "invalid_client", 700027,
                             f"The certificate with identifier used to sign the client assertion is not registered "
                             f"on application. [Reason - The key was not found., Thumbprint of key used by client: "
                             f"'{print_}'].")
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
        try:
            claims = jwt.decode(assertion, key, algorithms=["RS256", "PS256"], audience=endpoint,  # type: ignore[arg-type]
                                issuer=app.client_id, options={"require": ["exp", "aud", "iss", "sub"]})
        except jwt.ExpiredSignatureError as e:
            raise TokenError(401, "invalid_client", 700024,
                             "Client assertion is not within its valid time range.") from e
        except jwt.InvalidAudienceError as e:
            raise TokenError(401, "invalid_client", 700021,
                             f"Client assertion audience claim does not match Realm issuer {endpoint}.") from e
        except jwt.InvalidSignatureError as e:
            raise TokenError(401, "invalid_client", 700027, "Client assertion contains an invalid signature.") from e
        except jwt.PyJWTError as e:
            raise TokenError(401, "invalid_client", 700027, f"Client assertion failed validation: {e}.") from e
        if claims.get("sub") != app.client_id:
            raise TokenError(401, "invalid_client", 700023, "Client assertion subject is not the client id.")

    # -- bearer tokens on Graph -------------------------------------------------------------------------
    def client_of(self, token: str) -> str | None:
        """The client id a live access token was issued to; None for an unknown or expired one."""
        found = self.tokens.get(token)
        if found is None:
            return None
        if found.expires_at <= time.monotonic():
            del self.tokens[token]
            return None
        return found.client_id

    def expire_tokens(self) -> int:
        """Every issued access token ends now (a test of the client's renewal)."""
        n = len(self.tokens)
        self.tokens.clear()
        return n


def client_certificate(client_id: str) -> dict[str, str]:
    """A self-signed RSA certificate for an application, as `New-SelfSignedCertificate` makes one: its PEM, the
    private key's PEM and the SHA-1 thumbprint in hex (what msal's ``client_credential`` takes)."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gateway-{client_id}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365)).sign(key, hashes.SHA256()))
    return {"public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "private_key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(),
            "thumbprint": cert.fingerprint(hashes.SHA1()).hex().upper()}
