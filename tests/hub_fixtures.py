"""The real reference hub for tests (a pytest plugin, loaded by tests/conftest.py): its settings, the running hub on a
free loopback port with the test PKI (restartable on the same port), an HTTP client that trusts the test CA, and the
operator's calls to the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from gateway.hub.server import HubSettings, RunningHub, start_hub
from gateway.security.secret import Secret
from tests.fake_gateway import FakeGateway

CUSTOMER = "acme"  # the customer the tunnel's and the end-to-end tests' gateways enroll for (fixture `customer`)
ADMIN = "admin-token-for-tests-0123456789"


class Hub:
    """The real hub, started on a free loopback port; restartable on the same port and data."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.running: RunningHub | None = None

    async def start(self) -> Hub:
        self.running = await start_hub(self.settings)
        self.settings = replace(self.settings, port=self.running.port)  # a restart comes back on the same port
        return self

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.close()
            self.running = None

    @property
    def hub(self) -> Any:
        assert self.running is not None
        return self.running.hub

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    async def token(self, ttl: timedelta = timedelta(hours=1)) -> str:
        token, _ = await self.hub.write(self.hub.store.issue_token, CUSTOMER, ttl)
        return token

    async def count(self) -> int:
        return await self.hub.read(self.hub.store.event_count, CUSTOMER)

    async def event_ids(self) -> list[str]:
        out: list[str] = []
        after = 0
        while True:
            batch = await self.hub.read(self.hub.store.events_after, CUSTOMER, after, 5000)
            if not batch:
                return out
            out += [e.event_id for e in batch]
            after = batch[-1].seq

    def session(self, gateway_id: str) -> Any:
        return self.hub.sessions.get(gateway_id)


class Vendor:
    """The operator's and the booking system's HTTP calls."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def call(self, method: str, path: str, *, token: str | None = ADMIN, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url + path, json=body, headers=hdrs) as resp:
            return resp.status, await resp.json()

    async def customer(self, customer: str = "contoso") -> str:
        """Add a customer and return an API key for it."""
        status, _ = await self.call("POST", "/admin/v1/customers", body={"id": customer, "name": customer.title()})
        assert status == 201
        status, doc = await self.call("POST", f"/admin/v1/customers/{customer}/api-keys")
        assert status == 201
        return str(doc["key"])

    async def token(self, customer: str = "contoso", ttl: float | None = None) -> str:
        status, doc = await self.call("POST", f"/admin/v1/customers/{customer}/enrollment-tokens",
                                      body={"ttl_seconds": ttl} if ttl else None)
        assert status == 201, doc
        return str(doc["token"])

    async def gateway(self, customer: str = "contoso") -> FakeGateway:
        gw = FakeGateway()
        status, doc = await gw.enroll(self.http, self.url, await self.token(customer))
        assert status == 201, doc
        return gw


@pytest.fixture
def hub_settings(tmp_path, pki) -> HubSettings:  # type: ignore[no-untyped-def]
    """Short intervals where a test waits for the hub to act (revocation, keep-alives, webhook retries); generous
    ones where load could make a test late (the hello, a command's answer). A test that needs another value starts
    its own hub with ``replace(hub_settings, ...)``."""
    return HubSettings(data_dir=tmp_path / "hub", host="127.0.0.1", port=0, cert_file=pki.cert_file,
                       key_file=pki.key_file, admin_token=Secret(ADMIN), webhook_ca_file=pki.ca_file,
                       revocation_check=0.1, heartbeat=5.0, hello_timeout=5.0, command_timeout=30.0,
                       webhook_retry_base=0.05, webhook_retry_max=0.2, sse_keepalive=0.3)


@pytest.fixture
async def hub(hub_settings: HubSettings) -> AsyncIterator[Hub]:
    running = await Hub(hub_settings).start()
    yield running
    await running.stop()


@pytest.fixture
async def customer(hub: Hub) -> str:
    """CUSTOMER on the hub, added the way `gateway hub customer add` does."""
    await hub.hub.write(hub.hub.store.add_customer, CUSTOMER, "Acme")
    return CUSTOMER


@pytest.fixture
async def http(pki) -> AsyncIterator[aiohttp.ClientSession]:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as session:
        yield session


@pytest.fixture
def vendor(http: aiohttp.ClientSession, hub: Hub) -> Vendor:
    return Vendor(http, hub.url)
