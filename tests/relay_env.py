"""The real reference hub for tests: on a free loopback port with the test PKI, restartable on the same port."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from gateway.hub.server import HubSettings, RunningHub, start_hub
from gateway.security.secret import Secret

CUSTOMER = "acme"
ADMIN = "admin-token-for-tests-0123456789"


class Hub:
    """The real hub, started on a free loopback port with the test PKI; restartable on the same port."""

    def __init__(self, data_dir: Path, pki: Any) -> None:
        self.settings = HubSettings(data_dir=data_dir, host="127.0.0.1", port=0, cert_file=pki.cert_file,
                                    key_file=pki.key_file, admin_token=Secret(ADMIN), revocation_check=0.2)
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
