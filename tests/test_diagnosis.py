"""Telling failures apart: an unreachable server, an unknown host, a TLS failure, an HTTP error status and real
throttling each have their own key, detail and remedy; an outage is one state for every room, true gauges, and one
log line when it starts and one when it ends; a change feed that dies is noticed, restarted, and polled around.

Real parts over real sockets: exchangelib against the simulator (or a port nothing listens on), the whole gateway
through init_app, and a TCP switch in front of the simulator that a test unplugs and plugs back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import GatewayError, Throttled, Unreachable, is_shared
from gateway.model import ROOM_STATES
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings, EwsSource
from tests.conftest import SimFixture, eventually
from tests.running_gateway import CREATED, ROOM1, ROOM2, ROOM3, appointment, soon, start


def closed_port() -> int:
    """A port nothing listens on: bound once by a listener that is then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        return int(s.getsockname()[1])


def source(url: str, **settings: Any) -> EwsSource:
    return EwsSource(EwsSettings(ews_url=url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", max_workers=2, timeout=10,
                                 **settings), SERVICE_PASSWORD)


async def failure(src: EwsSource, room: str = ROOM1) -> GatewayError:
    try:
        await src.verify(room)
    except GatewayError as e:
        return e
    finally:
        await src.close()
    raise AssertionError("verify succeeded")


@pytest.fixture
def ews(sim_factory: Any) -> SimFixture:
    return sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5, pull_minute=2.0))


# -- 1. each way of not reaching Exchange --------------------------------------------------------------------------
async def test_a_closed_port_is_cannot_connect_with_the_host_not_throttling():
    port = closed_port()
    e = await failure(source(f"http://127.0.0.1:{port}/EWS/Exchange.asmx"))
    assert isinstance(e, Unreachable) and not isinstance(e, Throttled)
    assert e.key == "cannot_connect" and e.host == f"127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in str(e) and "refused" in str(e) and "exchange.ews_url" in e.remedy
    assert is_shared(e)


async def test_an_unknown_host_is_unknown_host():
    e = await failure(source("https://exchange.nonexistent.invalid/EWS/Exchange.asmx"))
    assert isinstance(e, Unreachable) and e.key == "unknown_host"
    assert "exchange.nonexistent.invalid" in str(e) and "DNS" in e.remedy


async def test_a_wrong_ews_path_is_http_error_404_with_the_path(ews):
    e = await failure(source(ews.url.replace("/EWS/Exchange.asmx", "/EWS/Exchange.aspx")))
    assert isinstance(e, Unreachable) and e.key == "http_error" and e.status == 404
    assert "HTTP 404" in str(e) and "/EWS/Exchange.aspx" in str(e)
    assert "/EWS/Exchange.asmx" in e.remedy and "exchange.ews_url" in e.remedy


async def test_an_http_503_is_http_error_not_throttling(ews):
    ews.call(lambda: setattr(ews.sim.faults, "http_503_next", 1))
    e = await failure(source(ews.url))
    assert isinstance(e, Unreachable) and e.key == "http_error" and e.status == 503


async def test_an_untrusted_certificate_is_tls_error(sim_factory):
    tls = sim_factory(SimulatorConfig(rba_delay=0.05), tls=True)
    e = await failure(source(tls.url))
    assert isinstance(e, Unreachable) and e.key == "tls_error"
    assert "certificate" in str(e).lower() and "exchange.ca_bundle" in e.remedy


async def test_throttling_is_what_exchange_says_with_its_back_off(ews):
    ews.call(lambda: (setattr(ews.sim.throttle, "max_concurrent", 0), setattr(ews.sim.throttle, "back_off_ms", 1500)))
    e = await failure(source(ews.url))
    assert isinstance(e, Throttled) and e.key == "throttled" and e.back_off == 1.5
    assert "1.5 s" in str(e) and "ErrorServerBusy" in str(e)


async def test_a_soap_fault_exchangelib_does_not_know_is_an_answer_not_an_outage(ews):
    ews.call(lambda: ews.sim.faults.refuse.update({"GetFolder": "ErrorNotKnownToAnyone"}))
    e = await failure(source(ews.url))
    assert e.key == "exchange_error" and not is_shared(e) and "ErrorNotKnownToAnyone" in str(e)


async def test_a_mailbox_that_does_not_exist_is_mailbox_not_found_not_cannot_connect(ews):
    e = await failure(source(ews.url), "nobody@contoso.com")
    assert e.key == "mailbox_not_found" and "nobody@contoso.com" in str(e) and not is_shared(e)


# -- 1. an outage, as the running gateway shows it -----------------------------------------------------------------
async def requests_answered(g: Any, code: str) -> float:
    """EWS requests (any operation) that ended with ``code``, from /metrics."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in (await g.metrics()).splitlines()
               if line.startswith("gateway_ews_requests_total{") and f'code="{code}"' in line)


class Switch:
    """A TCP forwarder in front of the simulator: ``unplug`` closes its port and every connection through it (the
    port then refuses, like a stopped Exchange), ``plug`` opens the same port again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = closed_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/EWS/Exchange.asmx"

    async def plug(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def unplug(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # the test's loop is closing: end quietly (a handler task has no caller)
            writer.transport.abort()
            up_writer.transport.abort()
        self.writers -= {writer, up_writer}


async def test_an_outage_is_one_state_true_gauges_and_one_line_when_it_starts_and_ends(ews, tmp_path, aiohttp_client):
    rooms = (ROOM1, ROOM2, ROOM3)
    switch = Switch(ews.thread.port)
    await switch.plug()
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", rooms, url=switch.url, feed_retry=0.1,
                        retry_seconds=0.1, outage_remind_seconds=0.5)
        await eventually(lambda: g.imported(*rooms), what="imported")
        await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions == 3, what="subscribed")
        assert await g.metric("gateway_ews_streaming_connections") >= 1
        assert await g.metric("gateway_ews_subscriptions") == 3

        await switch.unplug()  # Exchange goes away
        for r in rooms:
            g.gw.coordinator.mark_dirty(r, "test")  # a sync is due in every room (a notification, the poll timer)
        await eventually(lambda: all(g.state(r) == "cannot_connect" for r in rooms), what="cannot_connect")
        rows = await g.rooms()
        assert all(f"127.0.0.1:{switch.port}" in rows[r]["reason"] and "refused" in rows[r]["reason"] for r in rooms)
        assert all(rows[r]["remedy"] == ROOM_STATES["cannot_connect"] for r in rooms)
        assert await g.metric("gateway_rooms", state="cannot_connect") == 3
        assert await g.metric("gateway_rooms", state="throttled") == 0
        async def no_open_stream() -> bool:
            return await g.metric("gateway_ews_streaming_connections") == 0
        await eventually(no_open_stream, what="no open stream counted")
        assert await g.metric("gateway_ews_subscriptions") == 0
        ready = await g.client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503
        assert any(r.startswith("no room is in sync (3 cannot_connect)") for r in body["reasons"])
        assert str(switch.port) not in str(body["reasons"])  # /readyz is open: no hosts or addresses
        gate = g.gw.sources["exchange"].opened.calendar.gate
        await eventually(lambda: gate.attempts >= 3, what="a few probes")
        await eventually(lambda: [e for e in logs if e["event"] == "exchange.outage_continues"], what="a reminder")
        refused_during = await requests_answered(g, "ErrorTimeoutExpired")

        await switch.plug()  # and comes back
        await eventually(lambda: all(g.state(r) == "verified" for r in rooms), what="verified again")
        await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions == 3, what="streaming again")
        uid = appointment(ews, ROOM2, "After the outage", soon())
        created = await eventually(lambda: g.events(ROOM2, CREATED), what="a change after the outage")
        assert created[0].data["uid"] == uid
        await g.client.close()
        await switch.unplug()

    started = [e for e in logs if e["event"] == "exchange.outage_started"]
    assert len(started) == 1, [(e["event"], e.get("key")) for e in logs if e["event"].startswith("exchange.")]
    assert started[0]["log_level"] == "warning" and started[0]["key"] == "cannot_connect"
    assert str(switch.port) in started[0]["reason"] and "exchange.ews_url" in started[0]["remedy"]
    ended = [e for e in logs if e["event"] == "exchange.outage_ended"]
    assert len(ended) == 1 and ended[0]["log_level"] == "info" and ended[0]["key"] == "cannot_connect"
    reminders = [e for e in logs if e["event"] == "exchange.outage_continues"]
    assert 1 <= len(reminders) <= ended[0]["seconds"] / 0.5 + 1
    # Rooms and streams say what happened to them at info level: the outage is the warning, not each room.
    noisy = [e for e in logs if e["log_level"] in ("warning", "error") and e["event"] not in
             ("exchange.outage_started", "exchange.outage_continues")]
    assert not noisy, noisy
    # Held back: the requests that met the closed port are the probes and those already out when it closed, not
    # one per room per retry.
    assert 1 <= refused_during <= gate.attempts + len(rooms) + 3, (refused_during, gate.attempts)


async def test_real_throttling_is_throttled_with_its_back_off_and_ends(ews, tmp_path, aiohttp_client):
    ews.call(lambda: (setattr(ews.sim.throttle, "max_concurrent", 0), setattr(ews.sim.throttle, "back_off_ms", 300)))
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2), feed="poll",
                        throttled_quiet_seconds=0.5)
        await eventually(lambda: all(g.state(r) == "throttled" for r in (ROOM1, ROOM2)), what="throttled")
        row = (await g.rooms())[ROOM1]
        assert "0.3 s" in row["reason"] and row["remedy"] == ROOM_STATES["throttled"]
        assert await g.metric("gateway_rooms", state="throttled") == 2
        assert await g.metric("gateway_rooms", state="cannot_connect") == 0
        assert await g.metric("gateway_ews_throttled_total") >= 2
        ews.call(lambda: setattr(ews.sim.throttle, "max_concurrent", 27))
        await eventually(lambda: g.imported(ROOM1, ROOM2), what="imported after the throttling")
        await eventually(lambda: [e for e in logs if e["event"] == "exchange.outage_ended"], what="the end logged")
    started = [e for e in logs if e["event"] == "exchange.outage_started"]
    assert [e["key"] for e in started] == ["throttled"]
    assert [e["key"] for e in logs if e["event"] == "exchange.outage_ended"] == ["throttled"]


async def test_a_wrong_ews_path_is_http_error_for_every_room_with_one_request_per_probe(ews, tmp_path, aiohttp_client):
    url = ews.url.replace("/EWS/Exchange.asmx", "/ews/exchange.svc")
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2, ROOM3), url=url, feed="pull",
                        pull_interval=0.1, ews_settings={"outage_retry_seconds": 5.0})
        await eventually(lambda: all(g.state(r) == "http_error" for r in (ROOM1, ROOM2, ROOM3)), what="http_error")
        row = (await g.rooms())[ROOM3]
        assert "HTTP 404" in row["reason"] and "/ews/exchange.svc" in row["reason"]
        assert "404" in row["remedy"] and "/EWS/Exchange.asmx" in row["remedy"]
        assert await g.metric("gateway_rooms", state="http_error") == 3
        # One request found the 404; the rooms and the feed were held back until the next probe is due (5 s).
        assert await requests_answered(g, "HttpStatusError") == 1
    assert len([e for e in logs if e["event"] == "exchange.outage_started"]) == 1


# -- 15. a change feed that dies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("feed", "omit", "error"), [("pull", "Watermark", "AttributeError"),
                                                     ("streaming", "SubscriptionId", "FeedBroken")])
async def test_a_change_feed_that_dies_is_logged_restarted_and_rooms_poll_meanwhile(
        feed, omit, error, ews, tmp_path, aiohttp_client):
    # Another server's SubscribeResponse without a watermark (exchangelib fails with an AttributeError) or without
    # a subscription id (the streaming feed refuses it).
    ews.call(lambda: ews.sim.faults.omit.update({"Subscribe": {omit}}))
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2), feed=feed, pull_interval=0.1,
                        feed_down_poll_seconds=0.3, reconcile_seconds=3600.0,
                        options={"feed_restart_seconds": 0.2})
        await eventually(lambda: all(g.state(r) == "polling" for r in (ROOM1, ROOM2)), what="polling")
        row = (await g.rooms())[ROOM1]
        assert f"change feed down ({error}: " in row["reason"] and "polling every 0.3 s" in row["reason"]
        assert row["remedy"] == ROOM_STATES["polling"]
        assert await g.metric("gateway_ews_feed_up") == 0
        assert await g.metric("gateway_rooms", state="polling") == 2
        assert (await g.client.get("/readyz")).status == 200  # in sync, only slower

        uid = appointment(ews, ROOM1, "Found by polling", soon())
        created = await eventually(lambda: g.events(ROOM1, CREATED), what="a change found by polling")
        assert created[0].data["uid"] == uid
        await eventually(lambda: len([e for e in logs if e["event"] in ("task.failed", "task.failed_again")]) >= 2,
                         what="restarted and failed again")

        ews.call(lambda: ews.sim.faults.omit.clear())  # the feed can run again
        await eventually(lambda: all(g.state(r) == "verified" for r in (ROOM1, ROOM2)), what="verified again")
        assert await g.metric("gateway_ews_feed_up") == 1
        await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions == 2, what="subscribed")
        # Announced when it changes, not again on every restart of the feed (the same state twice in a row would be
        # a restart announced as news).
        states = g.states(ROOM1)
        assert states[-1] == "verified" and all(a != b for a, b in itertools.pairwise(states)), states
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert len(failed) == 1 and failed[0]["task"] == f"feed:{feed}" and error in failed[0]["error"]
    assert type(failed[0]["exc_info"]).__name__ == error  # the traceback, once
    assert all("exc_info" not in e for e in logs if e["event"] == "task.failed_again")


# -- 2. doctor: one diagnosis per problem ---------------------------------------------------------------------------
def doctor_lines(out: str) -> list[list[str]]:
    """The report's check lines as [mark, what, key, text]."""
    rows = []
    for line in out.splitlines():
        mark = line[:4].strip()
        if mark not in ("ok", "warn", "FAIL", "skip"):
            continue
        head, _, text = line[6:].partition("  -> ")
        what, _, key = head.rstrip().rpartition(" ")
        rows.append([mark, what.strip(), key, text])
    return rows


async def run_doctor(tmp_path: Any, capsys: Any, monkeypatch: Any, url: str, rooms: list[str],
                     room_lists: tuple[str, ...] = ()) -> tuple[int, list[list[str]]]:
    from gateway.service import doctor
    from tests.gateway_cli import write_config

    monkeypatch.setenv("DIAG_EXCHANGE_PASSWORD", SERVICE_PASSWORD)
    cfg = write_config(tmp_path, url, rooms, closed_port(), room_lists=room_lists,
                       password_ref="env:DIAG_EXCHANGE_PASSWORD")
    capsys.readouterr()
    code = await doctor(cfg)
    return code, doctor_lines(capsys.readouterr().out)


async def test_doctor_tells_a_wrong_path_a_closed_port_an_unknown_host_and_a_missing_room_list_apart(
        ews, tmp_path, capsys, monkeypatch):
    rooms = [ROOM1, ROOM2]
    port = closed_port()
    cases = {
        "wrong path": (ews.url.replace("/EWS/Exchange.asmx", "/EWS/Exchange.aspx"), ()),
        "closed port": (f"http://127.0.0.1:{port}/EWS/Exchange.asmx", ()),
        "unknown host": ("https://exchange.nonexistent.invalid/EWS/Exchange.asmx", ()),
        "no such room list": (ews.url, ("rooms-nowhere@contoso.com",)),
    }
    found: dict[str, list[str]] = {}
    for case, (url, lists) in cases.items():
        code, lines = await run_doctor(tmp_path, capsys, monkeypatch, url, rooms, lists)
        failed = [ln for ln in lines if ln[0] == "FAIL"]
        assert code == 1 and len(failed) == 1, (case, lines)
        found[case] = failed[0]
        if case != "no such room list":  # the logon failed: one line, and no room was tried
            assert failed[0][1].startswith(f"Exchange {url}"), lines
            assert [ln[:3] for ln in lines if ln[0] == "skip"] == [["skip", "rooms and room lists (2)", "not_checked"]]
            assert not [ln for ln in lines if ln[1].startswith("room ")], lines
        else:
            assert [ln[1] for ln in lines if ln[0] == "ok" and ln[1].startswith("room ")] == [f"room {ROOM1}",
                                                                                             f"room {ROOM2}"]
    keys = {case: line[2] for case, line in found.items()}
    assert keys == {"wrong path": "http_error", "closed port": "cannot_connect", "unknown host": "unknown_host",
                    "no such room list": "room_list_not_found"}
    assert "HTTP 404" in found["wrong path"][3] and "/EWS/Exchange.aspx" in found["wrong path"][3]
    assert "/EWS/Exchange.asmx" in found["wrong path"][3]  # the remedy names the right path
    assert f"127.0.0.1:{port}" in found["closed port"][3] and "refused" in found["closed port"][3]
    assert "exchange.nonexistent.invalid" in found["unknown host"][3] and "DNS" in found["unknown host"][3]
    assert found["no such room list"][1] == "room list rooms-nowhere@contoso.com"
    assert "rooms-nowhere@contoso.com" in found["no such room list"][3]
    assert len({line[3] for line in found.values()}) == 4  # four remedies, not one
