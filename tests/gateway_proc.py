"""A gateway in its own process, for crash tests: python -m tests.gateway_proc EWS_URL STORE ROOM..."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.app import GatewayOptions, start_gateway
from gateway.observability.logging import configure_logging
from gateway.observability.metrics import Metrics
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings
from gateway.sync.coordinator import SyncSettings


async def main(url: str, store: str, rooms: list[str]) -> None:
    configure_logging("warning", "json")
    options = GatewayOptions(
        ews=EwsSettings(ews_url=url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=tuple(rooms),
        sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, poll_seconds=0.5),
        store_path=Path(store), feed="poll")
    await start_gateway(options, Metrics())
    print("started", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
