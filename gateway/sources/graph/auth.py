"""Tokens for one Graph source: msal client credentials, one ConfidentialClientApplication per source (its token
cache answers until five minutes before expiry, so the token endpoint sees one request an hour), called in a
thread (msal blocks). A certificate (its private key and certificate in one PEM, from the vault) is preferred; a
client secret works too. Tokens and secrets never reach a log line, an error or a metric.

A refused credential (invalid_client: an expired or revoked secret or certificate, a wrong one) is an AuthError
with key ``auth_required`` and the remedy; it is logged once until a token is granted again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msal
import requests
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import AuthError, ConfigError, GatewayError, TlsError, UnknownHost, Unreachable
from gateway.sources.graph.settings import GraphSettings

log = structlog.get_logger("gateway.sources.graph")

# Authority hosts msal knows (public and national clouds); any other (a simulator, a proxy) skips its instance
# discovery, which would ask login.microsoftonline.com about it.
KNOWN_AUTHORITIES = ("login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn",
                     "login.partner.microsoftonline.cn", "login-us.microsoftonline.com")


@dataclass(frozen=True)
class Certificate:
    """A client certificate: the PEM msal signs its assertion with, and what Entra ID knows it by."""

    private_key: str
    certificate: str
    thumbprint: str  # SHA-1 of the DER, hex (what the app registration lists)
    not_after: datetime

    @classmethod
    def from_pem(cls, pem: str) -> Certificate:
        data = pem.encode()
        try:
            key = serialization.load_pem_private_key(data, password=None)
            cert = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE-----"):])
        except (ValueError, TypeError) as e:  # never repeat the PEM: it holds the private key
            raise ConfigError("the Graph certificate is not a PEM with an unencrypted private key and its "
                              "certificate", remedy="store both in one PEM with `gateway credentials set NAME`") from e
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(key_pem, cert.public_bytes(serialization.Encoding.PEM).decode(),
                   hashlib.sha1(der).hexdigest().upper(), cert.not_valid_after_utc.astimezone(UTC))


class TokenSource:
    """Access tokens for one source's app registration."""

    def __init__(self, settings: GraphSettings, secret: str) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._app: Any = None
        self._http: requests.Session | None = None
        self._refused: str | None = None  # the refusal last logged (logged once until a token is granted)
        self.certificate: Certificate | None = None
        self._secret = ""
        # The token in hand until five minutes before it ends (as msal's cache would say), so that requests do not
        # each take a thread to ask msal; one refresh at a time (a hanging token endpoint holds one thread, not all).
        self._token: tuple[str, float] | None = None
        self._refresh = asyncio.Lock()
        self.set_secret(secret)

    def set_secret(self, secret: str) -> None:
        """New credentials (re-read from the vault): a new application object, its cache empty."""
        with self._lock:
            self.certificate = Certificate.from_pem(secret) if self.settings.credential == "certificate" else None
            self._secret = secret
            self._app = None
            self._token = None

    def _application(self) -> Any:
        with self._lock:
            if self._app is None:
                s = self.settings
                credential: Any = self._secret
                if self.certificate is not None:
                    # No SHA-1 thumbprint: msal then signs with PS256 and names the certificate by its SHA-256
                    # thumbprint (x5t#S256), as Entra ID prefers.
                    credential = {"private_key": self.certificate.private_key,
                                  "public_certificate": self.certificate.certificate}
                known = urlsplit(s.authority_host).hostname in KNOWN_AUTHORITIES
                # Our own session: requests lets REQUESTS_CA_BUNDLE override a session's CA bundle (psf/requests
                # #3829), so the configured one is passed with every request.
                http = self._http = requests.Session()
                http.request = functools.partial(http.request, timeout=s.timeout,  # type: ignore[method-assign]
                                                 verify=s.ca_bundle or True)
                self._app = msal.ConfidentialClientApplication(
                    s.client_id, client_credential=credential, authority=s.authority, http_client=http,
                    instance_discovery=None if known else False, validate_authority=known)
            return self._app

    def _acquire(self) -> tuple[str, float]:
        s = self.settings
        try:
            result = self._application().acquire_token_for_client(scopes=[s.scope])
        except (requests.RequestException, OSError) as e:
            raise _unreachable(e, s.authority_host) from e
        except ValueError as e:  # msal: the authority's discovery document could not be read
            with self._lock:
                self._app = None  # build it again next time: msal keeps a failed discovery
            raise Unreachable(f"the token endpoint at {s.authority} did not answer as an OpenID provider: {e}",
                              host=urlsplit(s.authority_host).netloc, key="http_error",
                              remedy="check authority_host and tenant_id") from e
        token = result.get("access_token") if isinstance(result, dict) else None
        if token:
            if self._refused is not None:
                log.info("graph.auth_restored", tenant=s.tenant_id, client=s.client_id)
                self._refused = None
            return str(token), float(result.get("expires_in") or 3599)
        error = str((result or {}).get("error") or "no_token")
        description = str((result or {}).get("error_description") or "").split("\r\n")[0].split("\n")[0]
        code = description.split(":")[0] if description.startswith("AADSTS") else ""
        what = "certificate" if self.certificate is not None else "client secret"
        expired = code in ("AADSTS7000222", "AADSTS700027") or "expired" in description.lower()
        remedy = (f"create a new {what} for the app registration {s.client_id} in Entra ID and store it with "
                  f"`gateway credentials set NAME`" if expired or error == "invalid_client" else
                  f"check tenant_id and client_id, and that the app registration {s.client_id} exists in the tenant")
        why = f"{'expired' if expired else 'refused'} ({error}{', ' + code if code else ''})"
        if self._refused != why:
            log.error("graph.auth_refused", tenant=s.tenant_id, client=s.client_id, error=error, code=code,
                      credential=what, expired=expired)
            self._refused = why
        refused = AuthError(f"Entra ID refused the {what} of app {s.client_id}: {why}", key="auth_required",
                            remedy=remedy)
        refused.own_remedy = True  # the room shows this remedy, not the one for an EWS service account
        raise refused

    def forget(self) -> None:
        """Drop the cached token (Graph refused it before its time: revoked, or the tenant's keys rolled)."""
        with self._lock:
            self._token = None
            if self._app is not None:
                self._app.remove_tokens_for_client()

    def close(self) -> None:
        """Close the token endpoint's connections."""
        with self._lock:
            if self._http is not None:
                self._http.close()
            self._http = self._app = None

    async def token(self) -> str:
        """A valid access token (msal's cache first); AuthError or Unreachable when there is none."""
        held = self._token
        if held is not None and time.monotonic() < held[1]:
            return held[0]
        async with self._refresh:
            held = self._token
            if held is not None and time.monotonic() < held[1]:
                return held[0]
            token, lasts = await asyncio.to_thread(self._acquire)
            self._token = (token, time.monotonic() + max(0.0, lasts - 300))
            return token


def _unreachable(e: BaseException, url: str) -> GatewayError:
    host = urlsplit(url).netloc
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(c, ssl.SSLError | requests.exceptions.SSLError) for c in chain):
        return TlsError(f"TLS with the token endpoint {host} failed: {str(chain[-1])[:160]}", host=host,
                        remedy="check the certificate of authority_host, or give the CA that issued it in ca_bundle")
    if "NameResolutionError" in {type(c).__name__ for c in chain}:
        return UnknownHost(f"the host name of the token endpoint {host} cannot be resolved", host=host)
    return Unreachable(f"cannot connect to the token endpoint {host}: {str(e)[:160]}", host=host,
                       remedy="check authority_host and that the gateway may reach it (proxy, firewall)")
