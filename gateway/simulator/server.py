"""The simulator's HTTP face: /EWS/Exchange.asmx with Exchange's authentication, validation and throttling."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import secrets
import ssl
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from lxml import etree

from gateway.simulator import schema
from gateway.simulator.faults import Faults
from gateway.simulator.graph.service import GraphConfig, GraphService
from gateway.simulator.lockout import LOCKED_TEXT, Lockouts
from gateway.simulator.mailboxes import Directory, Mailbox
from gateway.simulator.ntlm import NtlmAcceptor, NtlmError
from gateway.simulator.ops import OPERATIONS, RESPONSE_CODE, Context, load_all
from gateway.simulator.schema import TNS
from gateway.simulator.soap import (
    ACCEPTED_VERSIONS,
    EwsError,
    collect_fragments,
    envelope,
    fault_body,
    materialize,
    parse_envelope,
    unsupported,
)
from gateway.simulator.throttle import Throttle

log = structlog.get_logger("gateway.simulator")

EWS_PATH = "/ews/exchange.asmx"
SIM_APP: web.AppKey[Simulator] = web.AppKey("simulator")


@dataclass
class SimulatorConfig:
    domain: str = "contoso.com"
    netbios: str = "CONTOSO"
    basic_auth: bool = True
    ntlm_auth: bool = True
    validate_responses: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    max_concurrent: int = 27
    max_streams: int = 10
    back_off_ms: int = 2000
    backends: int = 2
    rba_delay: float = 0.2  # seconds before a room's booking attendant answers a request
    stream_minute: float = 60.0  # how many real seconds one ConnectionTimeout minute lasts
    keepalive_seconds: float = 45.0  # streaming keep-alive interval
    pull_minute: float = 60.0  # how many real seconds one pull-subscription Timeout minute lasts
    control_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    graph: GraphConfig = field(default_factory=GraphConfig)  # the Exchange Online tenant (gateway/simulator/graph)


class _ConnState:
    __slots__ = ("ntlm", "user")

    def __init__(self) -> None:
        self.ntlm: NtlmAcceptor | None = None
        self.user: Mailbox | None = None


class Simulator:
    """An Exchange 2016 organisation: directory, calendars, notifications, booking attendant and the EWS endpoint."""

    def __init__(self, config: SimulatorConfig | None = None, directory: Directory | None = None) -> None:
        from gateway.simulator.actions import Calendars
        from gateway.simulator.attendant import BookingAttendant
        from gateway.simulator.notifications import NotificationHub

        self.config = config or SimulatorConfig()
        self.directory = directory or Directory(self.config.domain, self.config.netbios, self.config.backends)
        self.throttle = Throttle(self.config.max_concurrent, self.config.max_streams, self.config.back_off_ms)
        self.faults = Faults()
        self.notifications = NotificationHub(self)
        self.calendars = Calendars(self)
        self.attendant = BookingAttendant(self)
        self.graph = GraphService(self, self.config.graph)
        self.calls: Counter[tuple[str, str]] = Counter()  # (operation, response code)
        self.generation = 0  # bumped by restart(); streams of an older generation end
        self.failed_logons = 0  # each one counts towards the account's lockout threshold in Active Directory
        self.lockouts = Lockouts()  # ... which the simulator applies when one is set (control: /control/lockout)
        self._conns: weakref.WeakKeyDictionary[Any, _ConnState] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Tests set this to see every (operation, request, response) exchange; streams are not recorded.
        self.recorder: Callable[[str, bytes, bytes], None] | None = None
        self.header_recorder: Callable[[str, dict[str, str]], None] | None = None  # (operation, HTTP headers)
        load_all()

    # -- lifecycle -----------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app[SIM_APP] = self
        from gateway.simulator.control import add_control_routes

        add_control_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        self.notifications.close_all()
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run background work (booking attendant, activity) tied to the simulator's lifetime."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def restart(self) -> None:
        """What an IIS app-pool recycle does: every subscription and open stream is lost; mailboxes stay."""
        self.generation += 1
        self.notifications.restart()
        self._conns.clear()
        log.info("simulator.restarted", generation=self.generation)

    # -- request handling ----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.lower() != EWS_PATH:
            return web.Response(status=404, text="Not found\n")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"}, text="EWS accepts POST only\n")
        if self.faults.take_503():
            return web.Response(status=503, text="Service Unavailable\n", headers={"Retry-After": "1"})
        user = self._authenticate(request)
        if isinstance(user, web.Response):
            await request.read()  # drain, so the connection stays usable for the next handshake leg
            return user
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="Request body too large\n")
        ctype = request.headers.get("Content-Type", "")
        if not ctype.lower().startswith("text/xml"):
            return self._fault(EwsError("ErrorInvalidRequest", "Content-Type must be text/xml.", fault=True),
                               status=415)
        operation = "?"
        collect_fragments()
        try:
            req = parse_envelope(data)
            operation = req.operation
            if self.header_recorder is not None:
                self.header_recorder(operation, dict(request.headers))
            self._validate_request(req.header, req.body)
            version = self._version(req.header)
            target, impersonating = self._impersonate(user, req.header)
            tz = self._tz_context(req.header)
            ctx = Context(self, user, target, impersonating, version, tz, request, req.header)
            handler = None if operation in self.faults.unsupported else OPERATIONS.get(operation)
            if operation in self.faults.refuse:
                raise EwsError(self.faults.refuse[operation], f"{operation} is refused (injected).", fault=True)
            if handler is None:
                result = _unsupported(operation)
            else:
                with self.throttle.request(user.smtp):
                    await self.faults.delay(operation)  # a slow call holds its slot, as on a real server
                    result = await handler(ctx, req.body)
        except EwsError as e:
            self.calls[(operation, e.code)] += 1
            return self._fault(e, status=e.http_status)
        except (etree.XMLSyntaxError, ValueError, KeyError, IndexError, TypeError) as e:
            # A request the schema let through but the handler could not read: Exchange's answer is a fault.
            log.warning("simulator.request_not_understood", operation=operation, error=repr(e))
            self.calls[(operation, "ErrorInvalidRequest")] += 1
            return self._fault(EwsError("ErrorInvalidRequest", f"The request is invalid: {e}", fault=True))
        if isinstance(result, web.StreamResponse):
            self.calls[(operation, result.get(RESPONSE_CODE, "NoError"))] += 1
            return result
        if self.faults.omit.get(operation):
            result = materialize(result)  # the parts written as text become elements that can be left out
        self.faults.mangle(operation, result)
        self._count(operation, result)
        response = self._respond(result, ctx)
        if self.recorder is not None and isinstance(response.body, bytes):
            self.recorder(operation, data, response.body)
        return response

    def _count(self, operation: str, result: etree._Element) -> None:
        codes = result.iterfind(f".//{{{schema.MNS}}}ResponseCode")
        seen = False
        for code in codes:
            self.calls[(operation, code.text or "")] += 1
            seen = True
            break
        if not seen:
            self.calls[(operation, "NoError")] += 1

    def _respond(self, result: etree._Element, ctx: Context) -> web.Response:
        if self.config.validate_responses:
            problem = schema.validate(materialize(result))  # what is sent: the text-written parts included
            if problem:
                log.error("simulator.invalid_response", operation=etree.QName(result).localname, problem=problem)
                return self._fault(EwsError("ErrorInternalServerError",
                                            f"simulator bug: response violates the EWS schema: {problem}",
                                            fault=True))
        body = envelope([result])
        resp = web.Response(body=body, content_type="text/xml", charset="utf-8", headers=ctx.response_headers)
        for name, value in ctx.cookies.items():
            resp.set_cookie(name, value, path="/", httponly=True)
        return resp

    def _fault(self, err: EwsError, status: int = 500) -> web.Response:
        return web.Response(status=status, body=envelope([fault_body(err)]), content_type="text/xml",
                            charset="utf-8")

    def _validate_request(self, header: dict[str, etree._Element], body: etree._Element) -> None:
        for el in header.values():
            if etree.QName(el).namespace == TNS:
                problem = _header_problem(etree.tostring(el))
                if problem:
                    raise EwsError("ErrorSchemaValidation", f"The request failed schema validation: {problem}",
                                   fault=True, extra={"Violation": problem})
        problem = schema.validate_request(body)
        if problem:
            raise EwsError("ErrorSchemaValidation", f"The request failed schema validation: {problem}",
                           fault=True, extra={"Violation": problem})

    def _version(self, header: dict[str, etree._Element]) -> str:
        el = header.get("RequestServerVersion")
        if el is None:
            return "Exchange2013_SP1"
        version = el.get("Version", "")
        if version not in ACCEPTED_VERSIONS:
            raise EwsError("ErrorInvalidServerVersion",
                           f"The specified server version {version} is invalid for this server.", fault=True)
        return version

    def _impersonate(self, user: Mailbox, header: dict[str, etree._Element]) -> tuple[Mailbox, bool]:
        el = header.get("ExchangeImpersonation")
        if el is None:
            return user, False
        sid = el.find(f"{{{TNS}}}ConnectingSID")
        address = ""
        if sid is not None and len(sid):
            address = (sid[0].text or "").strip()
        if not address or "@" not in address:
            raise EwsError("ErrorInvalidExchangeImpersonationHeaderData",
                           "The impersonation header names no SMTP address or UPN.", fault=True)
        target = self.directory.find(address)
        if target is None:
            raise EwsError("ErrorNonExistentMailbox",
                           f"The SMTP address has no mailbox associated with it: {address}", fault=True)
        if target.side != "ews":  # moved to Exchange Online: on-premise EWS has only a remote mailbox object
            raise EwsError("ErrorNonExistentMailbox",
                           f"The SMTP address has no mailbox associated with it: {address}", fault=True)
        if target is not user and not self.directory.may_impersonate(user, target):
            raise EwsError("ErrorImpersonateUserDenied",
                           "The account does not have permission to impersonate the requested user.", fault=True)
        return target, True

    @staticmethod
    def _tz_context(header: dict[str, etree._Element]) -> str | None:
        el = header.get("TimeZoneContext")
        if el is None:
            return None
        tzdef = el.find(f"{{{TNS}}}TimeZoneDefinition")
        return tzdef.get("Id") if tzdef is not None else None

    # -- authentication ------------------------------------------------------------------------------
    def _conn(self, request: web.Request) -> _ConnState:
        transport = request.transport
        state = self._conns.get(transport)
        if state is None:
            state = _ConnState()
            self._conns[transport] = state
        return state

    def _challenge(self, extra: str | None = None) -> web.Response:
        headers: list[tuple[str, str]] = []
        if extra:
            headers.append(("WWW-Authenticate", extra))
        else:
            if self.config.ntlm_auth:
                headers += [("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", "NTLM")]
            if self.config.basic_auth:
                headers.append(("WWW-Authenticate", f'Basic realm="{self.config.domain}"'))
        resp = web.Response(status=401, text="401 - Unauthorized: Access is denied due to invalid credentials.\n")
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    def _authenticate(self, request: web.Request) -> Mailbox | web.Response:
        conn = self._conn(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        scheme = scheme.lower()
        if not header:
            if conn.user is not None:
                return conn.user  # NTLM authenticates the connection, as IIS does
            return self._challenge()
        if scheme == "basic" and self.config.basic_auth:
            try:
                username, _, password = base64.b64decode(token).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._challenge()
            user = self.directory.logon(username)
            if user is not None and self.lockouts.locked(user.smtp):
                return self._locked(user)
            if user is None or user.password is None or not secrets.compare_digest(user.password, password):
                log.info("simulator.logon_failed", scheme="basic", user=username)
                self.failed_logons += 1
                if user is not None:
                    self.lockouts.failed(user.smtp)
                return self._challenge()
            self.lockouts.succeeded(user.smtp)
            return user
        if scheme in ("ntlm", "negotiate") and self.config.ntlm_auth:
            try:
                blob = base64.b64decode(token)
            except binascii.Error:
                return self._challenge()
            if blob[:8] != b"NTLMSSP\x00" or len(blob) < 12:
                return self._challenge()  # Kerberos inside Negotiate is not offered
            msg_type = int.from_bytes(blob[8:12], "little")
            if msg_type == 1:
                conn.ntlm = NtlmAcceptor(self.config.netbios)
                conn.user = None
                try:
                    challenge = conn.ntlm.challenge_for(blob)
                except NtlmError:
                    return self._challenge()
                return self._challenge(f"{'NTLM' if scheme == 'ntlm' else 'Negotiate'} "
                                       + base64.b64encode(challenge).decode())
            if msg_type == 3 and conn.ntlm is not None:
                acceptor, conn.ntlm = conn.ntlm, None
                account: Mailbox | None = None
                try:
                    account = self._account(*acceptor.identity(blob))
                    if account is not None and self.lockouts.locked(account.smtp):
                        return self._locked(account)
                    domain, username = acceptor.verify(blob, self._password_for)
                except NtlmError as e:
                    log.info("simulator.logon_failed", scheme="ntlm", reason=str(e))
                    self.failed_logons += 1
                    if account is not None:
                        self.lockouts.failed(account.smtp)
                    return self._challenge()
                user = self._account(domain, username)
                if user is None:
                    return self._challenge()
                self.lockouts.succeeded(user.smtp)
                conn.user = user
                return user
        return self._challenge()

    def _account(self, domain: str, user: str) -> Mailbox | None:
        return (self.directory.logon(f"{domain}\\{user}") if domain else None) or self.directory.logon(user)

    def _locked(self, user: Mailbox) -> web.Response:
        """A logon as a locked-out account: refused whatever the password, as IIS words it."""
        log.info("simulator.logon_locked_out", user=user.smtp)
        return web.Response(status=401, text=LOCKED_TEXT)

    def _password_for(self, domain: str, user: str) -> str | None:
        mb = self.directory.logon(f"{domain}\\{user}") if domain else None
        mb = mb or self.directory.logon(user)
        if mb is None:
            return None
        if domain and domain.upper() not in (self.config.netbios.upper(), self.config.domain.upper()):
            return None
        return mb.password


def _unsupported(operation: str) -> etree._Element:
    """An operation of the schema this server leaves out: an EWS error response, as clients expect of Exchange
    (a SOAP fault only where the schema leaves no room for an error message)."""
    err = EwsError("ErrorInvalidOperation", f"The simulator does not implement {operation}.")
    answer = unsupported(operation, err)
    if answer is None:
        raise EwsError(err.code, err.text, fault=True)
    return answer


@functools.lru_cache(maxsize=16384)  # an impersonation header per mailbox: thousands of rooms
def _header_problem(xml: bytes) -> str | None:
    """Schema check of a SOAP header element, remembered: clients send the same few headers on every call."""
    return schema.validate(etree.fromstring(xml))


def self_signed_context(host: str = "localhost") -> tuple[ssl.SSLContext, bytes]:
    """A TLS context with a certificate generated now; returns it with the certificate's PEM."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    import tempfile
    from pathlib import Path

    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(cert_pem)
        (Path(d) / "k.pem").write_bytes(key_pem)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    return ctx, cert_pem


def monotonic() -> float:
    return time.monotonic()
