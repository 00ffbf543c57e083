from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from exchangelib import DELEGATE, IMPERSONATION, NTLM, Account, Configuration, Credentials, EWSTimeZone
from exchangelib.protocol import BaseProtocol, close_connections

from gateway.security.vault import Vault, parse_key
from gateway.simulator.harness import SimulatorThread
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD, Org, place_online, standard_org
from gateway.simulator.server import SimulatorConfig
from gateway.sources.memory import MemorySource

pytest_plugins = ["tests.hub_fixtures",  # the reference hub: hub_settings, hub, customer, http, vendor
                  "tests.ldap_server"]  # Active Directory (Samba): samba

TZ = EWSTimeZone("Europe/Berlin")

# Every test module belongs to one tier (the markers in pyproject.toml), so that `pytest -m unit` runs one alone.
# A module may say so itself (``pytestmark = pytest.mark.unit``); otherwise it is listed here.
TIERS: dict[str, tuple[str, ...]] = {
    # one part on its own, in this process: pure code, a SQLite file, an in-process HTTP server; no simulator
    "unit": ("test_api_commands", "test_api_keys", "test_app_options", "test_commands", "test_config",
             "test_coordinator", "test_engine", "test_errors", "test_frozen", "test_ews_http1", "test_ews_mapping",
             "test_http_layer",
             "test_identity",
             "test_json_tracebacks", "test_layers", "test_logging", "test_outage", "test_packaging", "test_retry",
             "test_sharding", "test_store", "test_vault", "test_vocabulary",
             "test_credential_watch", "test_secret_pickup", "test_collector"),
    # one suite that every implementation of a port (or of a published schema) passes
    "contract": ("test_directory_port", "test_relay_schemas", "test_source_contract"),
    # the appliance end to end over real sockets: the simulator, the hub, a proxy, subprocesses
    "e2e": ("test_app", "test_cli_gateway", "test_cli_pipe", "test_commands_e2e", "test_commands_ews",
            "test_config_doctor", "test_crash", "test_demo", "test_diagnosis", "test_ews_series", "test_ews_wire",
            "test_ews_writer",
            "test_gateway_rooms", "test_gateway_sync", "test_image", "test_outbox_metrics", "test_privacy",
            "test_relay_e2e", "test_relay_tunnel", "test_replicas", "test_sse_replay", "test_state_files",
            "test_streaming_capacity", "test_credential_lifecycle", "test_credential_ad"),
    # the Exchange simulator's own tests: what it answers to exchangelib
    "simulator": ("test_activity", "test_availability", "test_booking_attendant", "test_calendar_items", "test_cli",
                  "test_control", "test_directory_ops", "test_notifications", "test_protocol", "test_schema",
                  "test_schema_conformance", "test_sim_commands", "test_sim_fidelity", "test_simulator_graph",
                  "test_simulator_graph_subscriptions", "test_simulator_graph_writes", "test_simulator_graph_users",
                  "test_simulator_render", "test_simulator_cost",
                  "test_smoke", "test_sync"),
    # the reference hub's own tests
    "hub": ("test_hostile_input", "test_relay_hub"),
}
_TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        if item.path.stem in _TIER_OF:
            item.add_marker(_TIER_OF[item.path.stem])


@pytest.hookimpl(tryfirst=True)  # before a skip mark is evaluated: a skipped module needs its tier too
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A failure of each such test rather than a usage error: on xdist's workers that would end in an INTERNALERROR.
    if not any(item.get_closest_marker(tier) for tier in TIERS):
        pytest.fail(f"{item.path.name} belongs to no test tier: add it to TIERS in tests/conftest.py (or give it "
                    f"`pytestmark = pytest.mark.<tier>`; tiers: {', '.join(TIERS)})", pytrace=False)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the CLI in-process configures logging onto its captured stream; the next test would then
    log into that closed stream and fail far from the cause. Every test leaves logging as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def free_port() -> int:
    """A loopback port free now, for a server that is started by another process and must be told its port in
    advance (a server in this process binds port 0 instead)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (bounded; never a fixed sleep as the basis of an assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_decisions(ews: SimFixture, subject: str, count: int = 1, room: str = "room1@contoso.com",
                   timeout: float = 10.0) -> list[Any]:
    """The attendant's decisions about ``subject`` in ``room``, once it is idle and has made at least ``count``."""
    def enough() -> list[Any] | None:
        found = ews.decisions(subject, room)
        return found if found is not None and len(found) >= count else None
    return list(wait_for(enough, timeout, what=f"{count} decision(s) of {room}'s attendant about {subject!r}"))


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """The same inside a test's event loop; ``check`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class SimFixture:
    """A running simulator plus helpers to reach it with exchangelib over HTTP + NTLM."""

    def __init__(self, thread: SimulatorThread, org: Org) -> None:
        self.thread = thread
        self.org = org
        self._configs: dict[tuple[str, str], Configuration] = {}

    @property
    def sim(self):  # the Simulator object; touch its state only through .call()
        return self.thread.sim

    @property
    def url(self) -> str:
        return self.thread.ews_url

    def call(self, fn, *args, **kwargs):
        return self.thread.call(fn, *args, **kwargs)

    def decisions(self, subject: str, room: str) -> list[Any] | None:
        """The booking attendant's decisions about ``subject`` in ``room`` once it is idle (None while it still has
        work queued)."""
        def read() -> list[Any] | None:
            attendant = self.sim.attendant
            if not attendant.idle.is_set():
                return None
            return [d for d in attendant.decisions if d.subject == subject and d.room == room]
        return self.call(read)

    def covers(self, room: str, sync_state: str | None) -> bool:
        """Whether a client holding this SyncFolderItems state has seen every change in the room's calendar: the
        state's round is complete and its base is at or past the calendar's newest change (see
        gateway/simulator/ops/sync.py). Evidence that a sync ran, where a quiet period would only be a guess."""
        from gateway.simulator.ops.sync import decode_state
        from gateway.simulator.soap import EwsError

        def check() -> bool:
            if not sync_state:
                return False
            directory = self.sim.directory
            folder = directory.get(room).calendar
            try:
                base, top, _ = decode_state(directory, folder, sync_state)
            except EwsError:  # not a state this simulator issued (a test may plant one)
                return False
            newest = max([i.seq for i in folder.items.values()] + [t[0] for t in folder.tombstones], default=0)
            return top == 0 and base >= newest
        return bool(self.call(check))

    def config(self, username: str = f"CONTOSO\\{SERVICE_ACCOUNT}", password: str = SERVICE_PASSWORD,
               max_connections: int = 4) -> Configuration:
        key = (username, password)
        if key not in self._configs:
            self._configs[key] = Configuration(service_endpoint=self.url, credentials=Credentials(username, password),
                                               auth_type=NTLM, max_connections=max_connections)
        return self._configs[key]

    def room(self, smtp: str = "room1@contoso.com") -> Account:
        """A room, impersonated by the rooms-scoped service account."""
        return Account(smtp, config=self.config(), access_type=IMPERSONATION, autodiscover=False,
                       default_timezone=TZ)

    def organizer(self, smtp: str = "alice@contoso.com") -> Account:
        """A person, impersonated by the organizer-scoped service account (write path (a))."""
        return Account(smtp, config=self.config(f"CONTOSO\\{ORGANIZER_ACCOUNT}"), access_type=IMPERSONATION,
                       autodiscover=False, default_timezone=TZ)

    def user(self, smtp: str = "alice@contoso.com") -> Account:
        """A person logged on as themselves (as Outlook would)."""
        password = dict(self.org.users)[smtp]
        return Account(smtp, config=self.config(smtp.split("@")[0], password), access_type=DELEGATE,
                       autodiscover=False, default_timezone=TZ)


class ControlClient:
    """The simulator's control API (gateway/simulator/control.py) over its socket: (status, JSON body)."""

    def __init__(self, ews: SimFixture, token: str | None = None) -> None:
        self.base = ews.thread.base_url + "/control"
        self.token = ews.sim.config.control_token if token is None else token

    def __call__(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., SimFixture]]:
    started: list[SimulatorThread] = []

    def start(config: SimulatorConfig | None = None, rooms: int = 5, users: int = 5, tls: bool = False) -> SimFixture:
        holder: dict[str, Org] = {}

        def setup(sim) -> None:
            holder["org"] = standard_org(sim.directory, rooms=rooms, users=users)

        thread = SimulatorThread(config or SimulatorConfig(rba_delay=0.05), setup=setup, tls=tls).start()
        started.append(thread)
        return SimFixture(thread, holder["org"])

    yield start
    close_connections()
    BaseProtocol._protocol_cache.clear() if hasattr(BaseProtocol, "_protocol_cache") else None
    for thread in started:
        thread.stop()


@pytest.fixture
def ews(sim_factory) -> SimFixture:
    return sim_factory()


class GraphSim(SimFixture):
    """A hybrid organisation: one simulator serving EWS (``.ews_url``, HTTP + NTLM, as ``ews``) and Microsoft Graph
    (``.graph_url`` = ``https://127.0.0.1:PORT/v1.0``) with its Entra token endpoint (``.authority`` =
    ``https://127.0.0.1:PORT/<tenant_id>``) over HTTPS from the same mailboxes.

    - TLS: verify with ``.ca_bundle`` (a PEM path; the simulator's own CA).
    - Credentials: ``.client_id`` with ``.client_secret``, or ``.client_certificate`` (msal's ``client_credential``
      dict: private_key, thumbprint, public_certificate; registered with the app). msal needs
      ``instance_discovery=False`` (the authority is not a Microsoft host) and the CA: beware that msal's
      ``verify=ca_bundle`` loses to a REQUESTS_CA_BUNDLE environment variable (requests merges the environment over
      Session.verify), so ``.msal_app()`` passes an ``http_client`` that sets verify on every request. Scope: ``https://graph.microsoft.com/.default``.
    - Sides: ``.graph_rooms`` / ``.graph_users`` live in Exchange Online (Graph only; EWS impersonation of them
      fails with ErrorNonExistentMailbox), ``.ews_rooms`` / ``.ews_users`` on premises (Graph answers 404
      MailboxNotEnabledForRESTAPI). A meeting crossing sides reaches the other side with the same global object id.
    - ``.call(fn, ...)`` runs on the simulator's loop (``.sim.graph`` is the GraphService: ``.limits``, ``.tokens``,
      ``.calls``); ``.control(method, path, body)`` is the control API (gateway/simulator/control.py).
    """

    def __init__(self, thread: SimulatorThread, org: Org, graph_rooms: list[str], graph_users: list[str]) -> None:
        super().__init__(thread, org)
        self.graph_rooms = graph_rooms
        self.graph_users = graph_users
        self.ews_rooms = [r for r in org.rooms if r not in graph_rooms]
        self.ews_users = [u for u, _ in org.users if u not in graph_users]
        self.control = ControlClient(self)
        self._msal: Any = None

    @property
    def ews_url(self) -> str:
        return self.thread.ews_url

    @property
    def graph_url(self) -> str:
        return self.sim.graph.graph_url

    @property
    def authority(self) -> str:
        return self.sim.graph.authority

    @property
    def tenant_id(self) -> str:
        return self.sim.graph.config.tenant_id

    @property
    def client_id(self) -> str:
        return self.sim.graph.config.client_id

    @property
    def client_secret(self) -> str:
        return self.sim.graph.config.client_secret

    @property
    def ca_bundle(self) -> str:
        return self.thread.ca_bundle

    @property
    def client_certificate(self) -> dict[str, str]:
        from gateway.simulator.graph.tokens import client_certificate

        if not hasattr(self, "_certificate"):
            self._certificate = client_certificate(self.client_id)
            cert = self._certificate["public_certificate"].encode()
            self.call(lambda: self.sim.graph.tokens.apps[self.client_id].add_certificate(cert))
        return self._certificate

    def msal_app(self, credential: Any = None) -> Any:
        import msal
        import requests

        ca_bundle = self.ca_bundle

        class Verified(requests.Session):
            # msal's verify= sets Session.verify, which requests lets REQUESTS_CA_BUNDLE (set on many hosts and
            # images) override; a per-request verify is not overridden.
            def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
                kwargs["verify"] = ca_bundle
                return super().request(*args, **kwargs)

        return msal.ConfidentialClientApplication(
            self.client_id, client_credential=credential if credential is not None else self.client_secret,
            authority=self.authority, http_client=Verified(), instance_discovery=False)

    def token(self) -> str:
        if self._msal is None:
            self._msal = self.msal_app()
        result = self._msal.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
        assert "access_token" in result, result
        return str(result["access_token"])

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                token: str | None = None) -> tuple[int, Any, dict[str, str]]:
        """One Graph call (``path`` below /v1.0, or a full URL such as a nextLink): (status, JSON body, headers)."""
        import requests

        url = path if path.startswith("https://") else self.graph_url + path
        all_headers = {"Authorization": f"Bearer {token or self.token()}", **(headers or {})}
        resp = requests.request(method, url, json=body, headers=all_headers, verify=self.ca_bundle, timeout=30)
        return resp.status_code, (resp.json() if resp.content else None), dict(resp.headers)


@pytest.fixture
def graph_sim_factory() -> Iterator[Callable[..., GraphSim]]:
    started: list[SimulatorThread] = []

    def start(config: SimulatorConfig | None = None, rooms: int = 4, users: int = 4, graph_rooms: int = 2,
              graph_users: int = 2) -> GraphSim:
        holder: dict[str, Any] = {}

        def setup(sim) -> None:
            org = standard_org(sim.directory, rooms=rooms, users=users)
            holder["org"] = org
            holder["online"] = place_online(sim.directory, org, rooms=graph_rooms, users=graph_users)

        thread = SimulatorThread(config or SimulatorConfig(rba_delay=0.05), setup=setup, graph=True).start()
        started.append(thread)
        return GraphSim(thread, holder["org"], *holder["online"])

    yield start
    close_connections()
    for thread in started:
        thread.stop()


@pytest.fixture
def graph_sim(graph_sim_factory) -> GraphSim:
    """A hybrid simulator: rooms room1, room2 and users alice, bob on premises (EWS); rooms room3, room4 and users
    carol, dave in Exchange Online (Graph). See GraphSim for what it offers."""
    return graph_sim_factory()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A private CA and a server certificate for localhost/127.0.0.1 (gateway/security/certs.py)."""
    from gateway.security.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


VAULT_KEY = base64.b64encode(b"v" * 32).decode()  # the key of the `vault` fixture, as an environment variable holds it


@pytest.fixture
def vault(tmp_path) -> Vault:
    """An empty credential vault under tmp_path/gateway (gateway/security/vault.py), locked with VAULT_KEY."""
    return Vault(tmp_path / "gateway" / "credentials.vault", parse_key(VAULT_KEY, "test key"))


@pytest.fixture
def http_proxy(tmp_path):
    """Debian's tinyproxy on loopback with Basic authentication (tests/proxy.py)."""
    from tests.proxy import start_tinyproxy

    proxy = start_tinyproxy(tmp_path / "proxy")
    yield proxy
    proxy.process.terminate()
    try:
        proxy.process.wait(5)
    except Exception:
        proxy.process.kill()


_MEMORY_ROOMS = ("room1@contoso.com", "room2@contoso.com", "room3@contoso.com")
_MEMORY_PEOPLE = ("alice@contoso.com", "bob@contoso.com", "carol@contoso.com")
_MEMORY_NOW = datetime(2030, 1, 7, 8, tzinfo=UTC)  # a Monday morning


@pytest.fixture
def memory_source() -> MemorySource:
    """An in-memory calendar source (gateway/sources/memory.py): room1..room3@contoso.com, alice, bob and carol;
    its clock stands on a Monday 08:00 UTC (2030-01-07) until a test moves it."""
    source = MemorySource(now=_MEMORY_NOW)
    for i, email in enumerate(_MEMORY_ROOMS, 1):
        source.add_room(email, f"Room {i}", capacity=4 * i)
    for email in _MEMORY_PEOPLE:
        source.add_person(email)
    return source
