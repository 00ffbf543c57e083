"""Run a simulator on a real socket in a background thread (tests, demo, benchmarks)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.simulator.graph.tls import CA_FILE, GraphTls
from gateway.simulator.server import Simulator, SimulatorConfig

T = TypeVar("T")


# A test's simulator stops at once: a client that kept a request open (a stream the gateway's thread still reads)
# must not hold the test's teardown for aiohttp's default minute.
_SHUTDOWN_SECONDS = 2.0

class SimulatorThread:
    """``with SimulatorThread(...) as sim:`` serves EWS on 127.0.0.1 until the block ends."""

    def __init__(self, config: SimulatorConfig | None = None, *, setup: Callable[[Simulator], Any] | None = None,
                 host: str = "127.0.0.1", port: int = 0, tls: bool = False, graph: bool = False) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port
        self.tls = tls
        self.graph = graph  # also serve the Graph side over HTTPS (its own CA, on graph_port)
        self.graph_port = 0
        self._graph_dir: str | None = None
        self._graph_runner: web.AppRunner | None = None
        self.cert_pem: bytes | None = None
        self._setup = setup
        self.loop = asyncio.new_event_loop()
        self.sim: Simulator
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="ews-simulator", daemon=True)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ews_url(self) -> str:
        return f"{self.base_url}/EWS/Exchange.asmx"

    @property
    def graph_base(self) -> str:
        return f"https://{self.host}:{self.graph_port}"

    @property
    def ca_bundle(self) -> str:
        """The PEM file of the CA that signed the Graph side's certificate (verify TLS with it)."""
        assert self._graph_dir is not None, "start the thread with graph=True"
        return str(Path(self._graph_dir) / CA_FILE)

    def start(self) -> SimulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self.sim = Simulator(self.config)
        if self._setup is not None:
            self._setup(self.sim)
        ssl_ctx = None
        if self.tls:
            from gateway.simulator.server import self_signed_context

            ssl_ctx, self.cert_pem = self_signed_context(self.host)
        self._runner = web.AppRunner(self.sim.make_app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=_SHUTDOWN_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_ctx)
        await site.start()
        server: Any = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        if self.graph:
            await self._start_graph()

    async def _start_graph(self) -> None:

        self._graph_dir = tempfile.mkdtemp(prefix="graph-sim-")
        tls = GraphTls(Path(self._graph_dir))
        self._graph_runner = web.AppRunner(self.sim.graph.make_app(), access_log=None, handler_cancellation=True,
                                           shutdown_timeout=_SHUTDOWN_SECONDS)
        await self._graph_runner.setup()
        site = web.TCPSite(self._graph_runner, self.host, self.graph_port, ssl_context=tls.context)
        await site.start()
        server: Any = site._server
        self.graph_port = server.sockets[0].getsockname()[1]
        self.sim.graph.serving(self.graph_base)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the simulator's loop (its state is not thread-safe) and return the result."""
        async def run() -> T:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return await result
            return result
        fut: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return fut.result(timeout=60)

    async def _cleanup(self) -> None:
        assert self._runner is not None
        transports = []
        for runner in (self._runner, self._graph_runner):
            server = runner.server if runner is not None else None
            transports += [h.transport for h in server.connections if h.transport] if server is not None else []
        if self._graph_runner is not None:
            await self._graph_runner.cleanup()
            self._graph_runner = None
        await self._runner.cleanup()
        # A TLS connection is still shutting down when cleanup returns and would outlive the loop: end it now.
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0)  # abort() closes the socket on the next turn of the loop

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._cleanup(), self.loop).result(timeout=30)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()  # its selector and self-pipe, which would otherwise leak until garbage collection
        if self._graph_dir is not None:
            shutil.rmtree(self._graph_dir, ignore_errors=True)
            self._graph_dir = None

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
