"""A stand-in for the vendor's hub in Graph tests: an HTTPS endpoint that answers Graph's validation handshake and
forwards each notification to the gateway's NotificationInbox (ports.py), as the hub and the relay's tunnel do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.ports import Poke


class Inbox:
    """The gateway's side of the relay as a Graph source sees it (ports.NotificationInbox)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.up = True
        self.welcomed = True  # False: the hub has not told its URLs yet (before the tunnel's first welcome)
        self.listeners: list[tuple[Callable[[Poke], None], Callable[[bool], None]]] = []
        self.forwarded = 0

    def urls(self) -> tuple[str, str] | None:
        return (f"{self.base}/graph/notify", f"{self.base}/graph/lifecycle") if self.welcomed else None

    def connected(self) -> bool:
        return self.up

    def listen(self, on_poke: Callable[[Poke], None], on_connected: Callable[[bool], None]) -> Callable[[], None]:
        pair = (on_poke, on_connected)
        self.listeners.append(pair)
        return lambda: self.listeners.remove(pair)

    def poke(self, body: dict[str, Any], lifecycle: bool = False) -> None:
        self.forwarded += 1
        for on_poke, _ in list(self.listeners):
            on_poke(Poke(body, lifecycle, datetime.now(UTC)))

    def tunnel(self, up: bool) -> None:
        self.up = up
        self.welcomed = self.welcomed or up
        for _, on_connected in list(self.listeners):
            on_connected(up)


async def stand_in_hub(pki: Any) -> AsyncIterator[Inbox]:
    """A stand-in hub on HTTPS: answers Graph's validation, and forwards notifications while the tunnel is up."""
    inbox = Inbox("")

    async def receive(request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            return web.Response(text=token, content_type="text/plain")
        body = await request.json()
        if inbox.up:
            inbox.poke(body, lifecycle=request.path.endswith("/lifecycle"))
        return web.Response(status=202)
    app = web.Application()
    app.router.add_post("/graph/{kind}", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context())
    await site.start()
    inbox.base = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield inbox
    await runner.cleanup()
    await asyncio.sleep(0.1)  # the server's TLS transports finish closing
