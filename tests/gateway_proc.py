"""A gateway in its own process, for crash tests.

    python -m tests.gateway_proc EWS_URL STORE ROOM...      sync only, the rooms-scoped service account
    GATEWAY_PROC='{...}' python -m tests.gateway_proc --relay    with commands and the tunnel (see test_relay_e2e)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from gateway.app import GatewayOptions, start_gateway
from gateway.config import RelayConfig
from gateway.observability.logging import configure_logging
from gateway.observability.metrics import Metrics
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault, parse_key
from gateway.sharding import Shard
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD
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


async def relay_main(spec: dict) -> None:  # type: ignore[type-arg]
    configure_logging("warning", "json")
    identity = GatewayIdentity.load(Vault(Path(spec["vault"]), parse_key(spec["vault_key"], "test key")))
    options = GatewayOptions(
        ews=EwsSettings(ews_url=spec["ews_url"], username=f"CONTOSO\\{ORGANIZER_ACCOUNT}",
                        default_timezone="Europe/Berlin", max_workers=4),
        password=SERVICE_PASSWORD, rooms=tuple(spec["rooms"]),
        sync=SyncSettings(debounce_seconds=0.05, retry_seconds=0.3, poll_seconds=0.5),
        store_path=Path(spec["store"]), feed="poll",
        relay=RelayConfig(enabled=True, hub_url=spec["hub_url"], ca_bundle=Path(spec["ca"]), heartbeat_seconds=5,
                          reconnect_max_seconds=1),
        identity=identity,
        # One of several replicas sharing the rooms (tests/test_replicas.py): [ordinal, count].
        shard=Shard(*spec.get("shard", (0, 1))), replicated="shard" in spec)
    await start_gateway(options, Metrics())
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1:] == ["--relay"]:
        asyncio.run(relay_main(json.loads(os.environ["GATEWAY_PROC"])))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
