"""Reaching the hub: verified TLS, the corporate proxy (CONNECT with its credentials), what a failure to connect
means in words with its remedy, and how a WebSocket ended (its close code). Shared by the tunnel and
``gateway enroll``; ``probe`` is doctor's check of the way to the hub."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from gateway import __version__
from gateway.config import RelayConfig
from gateway.errors import ConfigError, GatewayError, ProtocolError, Unavailable
from gateway.relay import protocol

AGENT: Final = f"exchange-gateway/{__version__}"
# The close codes a hub sends (docs/relay-protocol.md, section 2), in words for the log.
CLOSE_MEANINGS: Final = {
    1000: "closed normally", 1001: "the hub is shutting down", 1006: "the connection was lost without a close frame",
    1009: "a frame was too large", 1011: "the hub could not store events", 4400: "a bad handshake",
    4401: "unauthorized", 4403: "this gateway was revoked", 4408: "no hello in time",
    4409: "replaced by a newer connection of this gateway",
}


class Ended(Exception):
    """The connection ended (closed by either side); not an error in itself."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(slots=True)
class Session:
    """One authenticated connection to the hub."""

    ws: aiohttp.ClientWebSocketResponse
    nonce: str  # the challenge of this connection: rotations sign over it
    key_id: str
    window: int
    session_id: str | None
    started: float
    notification_urls: tuple[str, str] | None = None  # from welcome: this gateway's Graph webhook URLs at the hub


def client_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Verified TLS: the CAs in ``ca_bundle`` (only those) or the system store. Never unverified."""
    if ca_bundle is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_bundle))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"relay.ca_bundle ({ca_bundle}) cannot be used: {getattr(e, 'strerror', None) or e}",
                          key="ca_bundle_unreadable",
                          remedy="point relay.ca_bundle at a readable PEM file of CA certificates") from None


def proxy_headers(settings: RelayConfig, password: str | None) -> dict[str, str] | None:
    """Basic credentials for the proxy's CONNECT (only the proxy sees them; the hub never does)."""
    if not settings.proxy_url or not settings.proxy_username:
        return None
    return {"Proxy-Authorization": aiohttp.encode_basic_auth(settings.proxy_username, password or "")}


def describe_connect_error(e: BaseException, *, what: str, ca_bundle: Path | None,
                           proxy_url: str | None) -> tuple[str, str]:
    """(stable key, message with the remedy) for a failure to reach the hub."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        detail = getattr(e, "certificate_error", None) or getattr(e, "os_error", None) or e
        if ca_bundle is not None:
            hint = (f"relay.ca_bundle ({ca_bundle}) does not hold the CA that issued the hub's certificate, or the "
                    "certificate does not name the hub's host; fix relay.ca_bundle")
        else:
            hint = ("the system's trusted CAs do not include the one that issued the hub's certificate; set "
                    "relay.ca_bundle to a PEM file with that CA")
        return "tls_error", f"the TLS connection to {what} was refused: {detail}; {hint}"
    if isinstance(e, aiohttp.ClientHttpProxyError):
        if e.status in (401, 407):  # 407 by the book; tinyproxy, for one, answers 401
            return "proxy_auth", (f"the proxy {proxy_url} refused the credentials ({e.status}); check "
                                  "relay.proxy_username and relay.proxy_password_ref")
        return "proxy_error", f"the proxy {proxy_url} refused to connect to {what} ({e.status} {e.message})"
    if isinstance(e, aiohttp.ClientProxyConnectionError):
        return "proxy_unreachable", f"cannot reach the proxy {proxy_url} ({e.os_error}); check relay.proxy_url"
    if isinstance(e, aiohttp.WSServerHandshakeError):
        hint = "check relay.hub_url (it ends in /v1/tunnel)" if e.status in (404, 405) else "the hub said no"
        return "hub_refused", f"{what} did not open a tunnel ({e.status} {e.message}); {hint}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "cannot_connect", (f"cannot reach {what} ({e.os_error.strerror or e.os_error}); check the address, "
                                  "DNS and that the firewall lets the gateway out" +
                                  (" (or set relay.proxy_url)" if proxy_url is None else ""))
    if isinstance(e, TimeoutError):
        return "timeout", f"{what} did not answer in time"
    if isinstance(e, aiohttp.ClientError | OSError):
        return "cannot_connect", f"the connection to {what} failed: {e.__class__.__name__}: {e}"
    return "error", f"{e.__class__.__name__}: {e}"


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.TEXT:
        return protocol.decode(msg.data)
    if msg.type == aiohttp.WSMsgType.BINARY:
        raise ProtocolError("the hub sent a binary frame", key="bad_message")
    raise ended(ws, msg, " during the handshake")


def ended(ws: aiohttp.ClientWebSocketResponse, msg: aiohttp.WSMessage, during: str = "") -> Ended:
    """Why the connection ended, with the close code it ended with. For a close frame that is the code in the
    frame: ``ws.close_code`` can have turned into 1006 by then, when aiohttp's echo of the close found the TCP
    connection already gone."""
    if msg.type == aiohttp.WSMsgType.CLOSE:
        sent = int(msg.data)
        said = f", {str(msg.extra)[:100]!r}" if msg.extra else ""
        return Ended(f"the hub closed the connection{during} (code {sent}: {_meaning(sent)}{said})", sent)
    code = None if ws.close_code is None else int(ws.close_code)
    if msg.type == aiohttp.WSMsgType.ERROR:  # this side closed, e.g. 1009 for a frame from the hub above the limit
        return Ended(f"the connection failed{during} (code {code}: {ws.exception() or msg.data})", code)
    return Ended(f"the connection closed{during} (code {code}: {_meaning(code)})", code)


def _meaning(code: int | None) -> str:
    return CLOSE_MEANINGS.get(code or 0, "an unknown close code")


async def probe(settings: RelayConfig, proxy_password: str | None = None, timeout: float = 15.0) -> None:
    """Reach the hub the way the tunnel does (TLS verified, through the proxy) and read its challenge, then leave
    without answering: a running gateway's session is not disturbed. GatewayError with a key and remedy if not."""
    if not settings.hub_url:
        raise ConfigError("relay.hub_url is not set", key="no_hub_url",
                          remedy="set it to the tunnel_url `gateway enroll` printed")
    what = f"the hub at {settings.hub_url}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
            ws = await http.ws_connect(settings.hub_url, protocols=(protocol.SUBPROTOCOL,),
                                       ssl=client_ssl_context(settings.ca_bundle), proxy=settings.proxy_url,
                                       proxy_headers=proxy_headers(settings, proxy_password),
                                       headers={"User-Agent": AGENT})
            try:
                msg = await receive(ws)
            finally:
                await ws.close()
    except GatewayError:
        raise
    except Ended as e:
        raise Unavailable(f"{what}: {e}", key="hub_closed") from None
    except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
        key, message = describe_connect_error(e, what=what, ca_bundle=settings.ca_bundle, proxy_url=settings.proxy_url)
        raise Unavailable(message, key=key) from None
    if msg.get("type") != "challenge":
        raise ProtocolError(f"{what} answered {msg.get('type')!r} instead of a challenge", key="unexpected")
