"""Streaming and pull notifications, driven with exchangelib over HTTP + NTLM against the simulator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
import requests
from exchangelib import IMPERSONATION, NTLM, Account, Configuration, Credentials, EWSDateTime
from exchangelib import CalendarItem as XCalendarItem
from exchangelib.errors import (
    ErrorExceededConnectionCount,
    ErrorExpiredSubscription,
    ErrorInvalidWatermark,
    ErrorNewEventStreamConnectionOpened,
    ErrorSchemaValidation,
    ErrorSubscriptionNotFound,
)
from exchangelib.services import GetStreamingEvents, SubscribeToPull
from exchangelib.services.common import EWSAccountService
from exchangelib.util import add_xml_child, create_element

from gateway.simulator import ids
from gateway.simulator.calendar import CalendarItem
from gateway.simulator.notifications import AFFINITY_COOKIE, affinity_cookie
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from tests.conftest import TZ, wait_for

FAST = SimulatorConfig(rba_delay=0.05, stream_minute=20.0, keepalive_seconds=0.5)


# -- helpers ------------------------------------------------------------------------------------------------
def add_item(ews: Any, smtp: str, subject: str, hours: int = 1) -> int:
    """Create a calendar item directly in the simulator's store (as another client would); returns its iid."""
    def run() -> int:
        d = ews.sim.directory
        mb = d.get(smtp)
        start = datetime(2030, 1, 7, 9, tzinfo=UTC) + timedelta(hours=hours)
        item = CalendarItem(d.new_iid(), mb, mb.calendar, start=start, end=start + timedelta(minutes=30),
                            subject=subject)
        d.add_item(item)
        return item.iid
    return int(ews.call(run))


def touch(ews: Any, iid: int, subject: str) -> None:
    def run() -> None:
        item = ews.sim.directory.item(iid)
        item.subject = subject
        ews.sim.directory.touch(item)
    ews.call(run)


def remove(ews: Any, iid: int) -> None:
    ews.call(lambda: ews.sim.directory.remove_item(ews.sim.directory.item(iid)))


def item_id(ews: Any, smtp: str, iid: int) -> str:
    return ids.item_id(ews.call(lambda: ews.sim.directory.get(smtp).idx), iid)


def attached(ews: Any, sid: str) -> bool:
    return bool(ews.call(lambda: any(sid in s.subs for s in ews.sim.notifications.streams)))


def open_streams(ews: Any) -> int:
    return int(ews.call(lambda: len(ews.sim.notifications.streams)))


def events_of(notifications: list[Any]) -> list[Any]:
    return [e for n in notifications for e in n.events]


class Listener(threading.Thread):
    """Runs get_streaming_events in its own thread, as the gateway does, collecting what arrives."""

    def __init__(self, folder: Any, sids: list[str], timeout: int = 1,
                 until: Callable[[list[Any]], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.sids = sids
        self.timeout = timeout
        self.until = until
        self.notifications: list[Any] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n in self.folder.get_streaming_events(self.sids, connection_timeout=self.timeout):
                self.notifications.append(n)
                if self.until is not None and self.until(self.notifications):
                    break
        except BaseException as e:  # handed to the test thread
            self.error = e

    def events(self) -> list[Any]:
        return events_of(list(self.notifications))

    def finish(self, timeout: float = 15.0) -> Listener:
        self.join(timeout)
        assert not self.is_alive(), "the streaming call did not end"
        return self


def has_events(iid_str: str, *kinds: str) -> Callable[[list[Any]], bool]:
    def check(notifications: list[Any]) -> bool:
        seen = {type(e).__name__ for e in events_of(notifications) if e.item_id and e.item_id.id == iid_str}
        return set(kinds) <= seen
    return check


@contextmanager
def anchored(anchor: str, cookie: str) -> Iterator[None]:
    """What the semantics doc tells the gateway to do for grouping: send the group anchor's X-AnchorMailbox and
    affinity cookie for every member (exchangelib always sends the member's own address)."""
    original = EWSAccountService._extra_headers

    def headers(self: EWSAccountService) -> dict[str, str]:
        h: dict[str, str] = original(self)
        h["X-AnchorMailbox"] = anchor
        h["X-PreferServerAffinity"] = "True"
        h[AFFINITY_COOKIE] = cookie
        return h

    with mock.patch.object(EWSAccountService, "_extra_headers", headers):
        yield


# -- streaming -------------------------------------------------------------------------------------------
def test_streaming_events_arrive_inside_an_open_connection(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    listener = Listener(room.calendar, [sid])
    listener.start()
    wait_for(lambda: attached(ews, sid), what="the stream to attach")

    # A booking made by a client (CreateItem through exchangelib) shows up while the connection stays open.
    start = EWSDateTime(2030, 1, 7, 10, tzinfo=TZ)
    created = XCalendarItem(account=room, folder=room.calendar, subject="Standup", start=start,
                            end=start + timedelta(minutes=30))
    created.save()
    wait_for(lambda: has_events(created.id, "CreatedEvent")(listener.notifications), what="CreatedEvent")
    assert listener.is_alive() and attached(ews, sid)

    iid = ids.parse_item_id(created.id)[1]
    touch(ews, iid, "Standup (moved)")
    wait_for(lambda: has_events(created.id, "ModifiedEvent")(listener.notifications), what="ModifiedEvent")
    remove(ews, iid)
    wait_for(lambda: has_events(created.id, "DeletedEvent")(listener.notifications), what="DeletedEvent")
    assert listener.is_alive(), "all three changes arrived on one open connection"

    events = [e for e in listener.events() if e.item_id and e.item_id.id == created.id]
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("CreatedEvent") < kinds.index("ModifiedEvent") < kinds.index("DeletedEvent")
    assert "FreeBusyChangedEvent" in kinds
    for e in events:
        assert e.parent_folder_id.id == room.calendar.id
        assert e.timestamp is not None
        assert e.watermark is None  # streaming notifications carry no watermarks (they cannot be resumed)
    modified = next(e for e in events if type(e).__name__ == "ModifiedEvent")
    assert modified.item_id.changekey != created.changekey  # the event names the new version

    # The gateway stops reading (closes the generator); the server notices and frees the hanging connection.
    listener.until = lambda _: True
    touch(ews, add_item(ews, "room1@contoso.com", "nudge"), "nudge 2")
    listener.finish()
    assert listener.error is None
    wait_for(lambda: ews.call(lambda: not ews.sim.throttle.streams), what="the stream slot to be released")
    assert open_streams(ews) == 0


def test_keepalives_then_closed_when_the_connection_timeout_is_up(sim_factory: Any) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=0.8, keepalive_seconds=0.1))
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()

    statuses: list[str | None] = []

    class Recording(GetStreamingEvents):
        def _get_element_container(self, message: Any, name: Any = None) -> Any:
            res = super()._get_element_container(message=message, name=name)
            statuses.append(self.connection_status)
            return res

    svc = Recording(account=room)
    notifications = list(svc.call(subscription_ids=[sid], connection_timeout=1))
    assert notifications == []  # keep-alives are whole envelopes, but carry no notifications
    assert statuses[-1] == "Closed"
    assert statuses.count("OK") >= 2 and set(statuses[:-1]) == {"OK"}
    # The server counts the call when its handler returns, which can be just after the client read "Closed".
    wait_for(lambda: ews.sim.calls[("GetStreamingEvents", "NoError")] == 1, what="the call to be counted")
    wait_for(lambda: open_streams(ews) == 0, what="the stream to end")
    # The subscription outlives the connection: the client reconnects with the same id.
    listener = Listener(room.calendar, [sid], until=lambda ns: bool(ns))
    listener.start()
    wait_for(lambda: attached(ews, sid), what="the reconnect")
    add_item(ews, "room1@contoso.com", "after reconnect")
    assert listener.finish().error is None
    assert any(type(e).__name__ == "CreatedEvent" for e in listener.events())


def raw_post(ews: Any, as_room: str, body: str, stream: bool = False, **headers: str) -> requests.Response:
    """A hand-written EWS request (Basic auth, impersonating ``as_room``), for what exchangelib does not expose."""
    envelope = (
        '<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
        'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Header>'
        '<t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
        f'<t:SmtpAddress>{as_room}</t:SmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></s:Header>'
        f'<s:Body>{body}</s:Body></s:Envelope>'
    )
    return requests.post(ews.url, data=envelope.encode(), auth=(f"CONTOSO\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD),
                         headers={"Content-Type": "text/xml; charset=utf-8", **headers}, stream=stream, timeout=30)


def test_chunked_wire_format(ews: Any) -> None:
    """One HTTP response, chunked, every chunk a complete envelope; the last says Closed."""
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    ews.call(lambda: setattr(ews.sim.config, "stream_minute", 0.3))
    ews.call(lambda: setattr(ews.sim.config, "keepalive_seconds", 0.1))
    body = (f'<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sid}</t:SubscriptionId>'
            '</m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>')
    with raw_post(ews, "room1@contoso.com", body, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Transfer-Encoding"] == "chunked"
        chunks = [c for c in r.raw.read_chunked(decode_content=False) if c]
    docs = b"".join(chunks).split(b"<?xml")
    envelopes = [d for d in docs if d.strip()]
    assert len(envelopes) >= 2
    assert all(e.rstrip().endswith(b"</s:Envelope>") for e in envelopes)
    assert b"<m:ConnectionStatus>OK</m:ConnectionStatus>" in envelopes[0]
    assert b"<m:ConnectionStatus>Closed</m:ConnectionStatus>" in envelopes[-1]


def test_unknown_and_expired_subscription_ids(ews: Any) -> None:
    room = ews.room("room1@contoso.com")
    good = room.calendar.subscribe_to_streaming()
    expired = room.calendar.subscribe_to_streaming()
    bogus = "JABFWDE2TUJYMDEuY29udG9zby5jb20QAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    assert ews.call(lambda: ews.sim.notifications.expire([expired])) == [expired]

    with pytest.raises(ErrorSubscriptionNotFound) as exc:
        list(room.calendar.get_streaming_events([good, bogus, expired], connection_timeout=1))
    # Exchange fails the whole call and lists the bad ids; exchangelib appends them to the message.
    assert bogus in str(exc.value) and expired in str(exc.value) and good not in str(exc.value)
    assert ews.sim.calls[("GetStreamingEvents", "ErrorSubscriptionNotFound")] == 1
    assert open_streams(ews) == 0 and not ews.sim.throttle.streams

    # A subscription that expires while its stream is open is reported on that stream, which then closes.
    ews.call(lambda: setattr(ews.sim.config, "stream_minute", 20.0))
    listener = Listener(room.calendar, [good])
    listener.start()
    wait_for(lambda: attached(ews, good), what="the stream to attach")
    ews.call(lambda: ews.sim.notifications.expire())
    listener.finish()
    assert isinstance(listener.error, ErrorSubscriptionNotFound) and good in str(listener.error)
    wait_for(lambda: open_streams(ews) == 0, what="the stream to close")


def test_unsubscribing_the_last_subscription_closes_its_stream(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    listener = Listener(room.calendar, [sid])
    listener.start()
    wait_for(lambda: attached(ews, sid), what="the stream to attach")
    assert room.calendar.unsubscribe(sid) is True
    assert listener.finish().error is None  # ConnectionStatus Closed: a normal end
    assert open_streams(ews) == 0


def test_restart_loses_subscriptions_and_kills_open_streams(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    listener = Listener(room.calendar, [sid])
    listener.start()
    wait_for(lambda: attached(ews, sid), what="the stream to attach")

    ews.call(ews.sim.restart)  # an app-pool recycle
    listener.finish()
    assert listener.error is not None and not isinstance(listener.error, ErrorSubscriptionNotFound)
    wait_for(lambda: not ews.call(lambda: dict(ews.sim.throttle.streams)), what="the slot to be released")

    with pytest.raises(ErrorSubscriptionNotFound):
        list(room.calendar.get_streaming_events(sid, connection_timeout=1))
    # Recovery: a fresh subscription works at once.
    fresh = room.calendar.subscribe_to_streaming()
    listener = Listener(room.calendar, [fresh], until=lambda ns: bool(ns))
    listener.start()
    wait_for(lambda: attached(ews, fresh), what="the new stream")
    add_item(ews, "room1@contoso.com", "after the recycle")
    assert listener.finish().error is None


def test_connection_reset_mid_stream_keeps_the_subscription(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    iid = add_item(ews, "room1@contoso.com", "before the stream")  # queued, delivered when the stream opens
    listener = Listener(room.calendar, [sid])
    listener.start()
    wait_for(lambda: listener.notifications, what="the queued events")
    assert item_id(ews, "room1@contoso.com", iid) in {e.item_id.id for e in listener.events() if e.item_id}

    assert ews.call(ews.sim.notifications.reset_streams) == 1
    listener.finish()
    # The transport closed without the chunked terminator: requests reports a broken chunked body.
    assert isinstance(listener.error, requests.exceptions.RequestException), repr(listener.error)
    wait_for(lambda: open_streams(ews) == 0, what="the server to forget the stream")

    # A reset loses the connection, not the subscription: events made meanwhile are waiting on reconnect.
    later = add_item(ews, "room1@contoso.com", "during the outage")
    listener = Listener(room.calendar, [sid], until=lambda ns: bool(ns))
    listener.start()
    assert listener.finish().error is None
    assert item_id(ews, "room1@contoso.com", later) in {e.item_id.id for e in listener.events() if e.item_id}


def test_exceeded_connection_count(sim_factory: Any) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=20.0, keepalive_seconds=0.5, max_streams=1))
    room = ews.room("room1@contoso.com")
    first = room.calendar.subscribe_to_streaming()
    second = room.calendar.subscribe_to_streaming()
    listener = Listener(room.calendar, [first], until=lambda ns: bool(ns))
    listener.start()
    wait_for(lambda: attached(ews, first), what="the first stream")

    # exchangelib answers ErrorExceededConnectionCount by shrinking its session pool and retrying; only a pool of
    # one lets the error through. With a bigger pool whose sessions are all checked out, exchangelib 5.6
    # deadlocks: decrease_poolsize() holds the pool lock while get_session() calls increase_poolsize(), which
    # takes the same (non-reentrant) lock. So the second stream uses a configuration with max_connections=1.
    solo = Account("room1@contoso.com", access_type=IMPERSONATION, autodiscover=False, default_timezone=TZ,
                   config=Configuration(service_endpoint=ews.url, auth_type=NTLM, max_connections=1,
                                        credentials=Credentials(f"{SERVICE_ACCOUNT}@contoso.com",
                                                                SERVICE_PASSWORD)))
    with pytest.raises(ErrorExceededConnectionCount):
        list(solo.calendar.get_streaming_events(second, connection_timeout=1))
    assert ews.sim.throttle.connection_count_answers == 1
    assert attached(ews, first)  # the open stream is untouched

    add_item(ews, "room1@contoso.com", "end the first stream")
    assert listener.finish().error is None
    wait_for(lambda: not ews.call(lambda: dict(ews.sim.throttle.streams)), what="the slot to be released")
    # With the slot free the second stream opens, and gets what was queued for it meanwhile.
    listener = Listener(solo.calendar, [second], until=lambda ns: bool(ns))
    listener.start()
    assert listener.finish().error is None
    assert [n.subscription_id for n in listener.notifications] == [second]


def test_a_newer_stream_takes_the_subscription_away(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    room = ews.room("room1@contoso.com")
    sid = room.calendar.subscribe_to_streaming()
    old = Listener(room.calendar, [sid])
    old.start()
    wait_for(lambda: attached(ews, sid), what="the first stream")
    new = Listener(room.calendar, [sid], until=lambda ns: bool(ns))
    new.start()
    old.finish()
    assert isinstance(old.error, ErrorNewEventStreamConnectionOpened), repr(old.error)
    assert sid in str(old.error)
    wait_for(lambda: attached(ews, sid) and open_streams(ews) == 1, what="the subscription on the new stream")
    add_item(ews, "room1@contoso.com", "for the new stream")
    assert new.finish().error is None and new.events()


# -- affinity -------------------------------------------------------------------------------------------
def _rooms_on_two_backends(ews: Any) -> tuple[str, str]:
    backends = ews.call(lambda: {mb.smtp: mb.backend for mb in ews.sim.directory.rooms()})
    first = min(backends)
    second = next(smtp for smtp in sorted(backends) if backends[smtp] != backends[first])
    return first, second


def test_grouping_rooms_of_two_backends_needs_the_anchor_and_its_cookie(sim_factory: Any) -> None:
    ews = sim_factory(FAST)
    anchor_smtp, member_smtp = _rooms_on_two_backends(ews)
    anchor = ews.room(anchor_smtp)
    anchor_sid = anchor.calendar.subscribe_to_streaming()
    anchor_backend = ews.call(lambda: ews.sim.directory.get(anchor_smtp).backend)
    assert anchor.affinity_cookie == affinity_cookie(ews.sim, anchor_backend)  # Set-Cookie on Subscribe

    # Without affinity: the member subscribes on its own server (its own anchor, and a connection pool of its
    # own so no cookie leaks over from the anchor's Subscribe), and the grouped stream cannot find it there.
    loner = Account(member_smtp, access_type=IMPERSONATION, autodiscover=False, default_timezone=TZ,
                    config=Configuration(service_endpoint=ews.url, auth_type=NTLM, max_connections=2,
                                         credentials=Credentials(SERVICE_ACCOUNT, SERVICE_PASSWORD)))
    lost_sid = loner.calendar.subscribe_to_streaming()
    with pytest.raises(ErrorSubscriptionNotFound) as exc:
        list(anchor.calendar.get_streaming_events([anchor_sid, lost_sid], connection_timeout=1))
    assert lost_sid in str(exc.value) and anchor_sid not in str(exc.value)
    # ... while the member's own stream (its own anchor and cookie) finds it: it is not gone, just elsewhere.
    own = Listener(loner.calendar, [lost_sid], until=lambda ns: bool(ns))
    own.start()
    wait_for(lambda: attached(ews, lost_sid), what="the member's own stream")
    add_item(ews, member_smtp, "own stream")
    assert own.finish().error is None

    # With affinity: the member subscribes with the anchor's X-AnchorMailbox and cookie, so its subscription
    # lives on the anchor's server, and one stream (impersonating the anchor) carries both rooms.
    member = ews.room(member_smtp)
    with anchored(anchor_smtp, anchor.affinity_cookie):
        member_sid = member.calendar.subscribe_to_streaming()
    grouped = Listener(anchor.calendar, [anchor_sid, member_sid],
                       until=lambda ns: {n.subscription_id for n in ns} >= {anchor_sid, member_sid})
    grouped.start()
    wait_for(lambda: attached(ews, anchor_sid) and attached(ews, member_sid), what="the grouped stream")
    a = add_item(ews, anchor_smtp, "anchor booking")
    m = add_item(ews, member_smtp, "member booking")
    assert grouped.finish().error is None
    by_sub = {n.subscription_id: {e.item_id.id for e in n.events if e.item_id} for n in grouped.notifications}
    assert item_id(ews, anchor_smtp, a) in by_sub[anchor_sid]
    assert item_id(ews, member_smtp, m) in by_sub[member_sid]


SUBSCRIBE_CALENDAR = (
    '<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="calendar"/>'
    '</t:FolderIds><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes>'
    '</m:StreamingSubscriptionRequest></m:Subscribe>'
)


def _subscribed_backend(ews: Any, resp: requests.Response) -> int:
    assert resp.status_code == 200, resp.text
    sid = resp.text.split("<m:SubscriptionId>")[1].split("</m:SubscriptionId>")[0]
    return int(ews.call(lambda: ews.sim.notifications.subscriptions[sid].backend))


def test_affinity_headers_and_cookie_forms(ews: Any) -> None:
    first, second = _rooms_on_two_backends(ews)
    backend = ews.call(lambda: {s: ews.sim.directory.get(s).backend for s in (first, second)})

    # X-PreferServerAffinity: true -> Set-Cookie naming the backend the request was routed to (the anchor's).
    r = raw_post(ews, second, SUBSCRIBE_CALENDAR, **{"X-AnchorMailbox": second, "X-PreferServerAffinity": "true"})
    assert r.cookies[AFFINITY_COOKIE] == affinity_cookie(ews.sim, backend[second])
    assert _subscribed_backend(ews, r) == backend[second]
    assert AFFINITY_COOKIE not in raw_post(ews, second, SUBSCRIBE_CALENDAR).cookies  # no affinity asked for

    # The cookie routes, as a Cookie header or as exchangelib's X-BackEndOverrideCookie header, over the anchor.
    cookie = affinity_cookie(ews.sim, backend[first])
    as_cookie = raw_post(ews, second, SUBSCRIBE_CALENDAR, **{"X-AnchorMailbox": second,
                                                             "Cookie": f"{AFFINITY_COOKIE}={cookie}"})
    as_header = raw_post(ews, second, SUBSCRIBE_CALENDAR, **{"X-AnchorMailbox": second, AFFINITY_COOKIE: cookie})
    assert _subscribed_backend(ews, as_cookie) == _subscribed_backend(ews, as_header) == backend[first]
    # Without cookie, the anchor decides; without anchor, the impersonated mailbox.
    assert _subscribed_backend(ews, raw_post(ews, second, SUBSCRIBE_CALENDAR, **{"X-AnchorMailbox": first})) \
        == backend[first]
    assert _subscribed_backend(ews, raw_post(ews, second, SUBSCRIBE_CALENDAR)) == backend[second]


def test_single_room_streams_just_work_with_default_headers(sim_factory: Any) -> None:
    """One subscription per stream, exchangelib's own headers, rooms on both backends, one shared pool."""
    ews = sim_factory(FAST)
    smtps = list(_rooms_on_two_backends(ews))
    accounts = {smtp: ews.room(smtp) for smtp in smtps}
    sids = {smtp: acc.calendar.subscribe_to_streaming() for smtp, acc in accounts.items()}
    listeners = {smtp: Listener(accounts[smtp].calendar, [sids[smtp]], until=lambda ns: bool(ns)) for smtp in smtps}
    for listener in listeners.values():
        listener.start()
    wait_for(lambda: all(attached(ews, sid) for sid in sids.values()), what="both streams")
    for smtp in smtps:
        add_item(ews, smtp, f"booking in {smtp}")
    for smtp, listener in listeners.items():
        assert listener.finish().error is None
        assert [n.subscription_id for n in listener.notifications] == [sids[smtp]]


# -- pull -------------------------------------------------------------------------------------------------
def test_pull_subscription_get_events_watermarks_and_more_events(sim_factory: Any) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05))
    room = ews.room("room1@contoso.com")
    sid, watermark = room.calendar.subscribe_to_pull(timeout=10)

    (quiet,) = list(room.calendar.get_events(sid, watermark))
    assert [type(e).__name__ for e in quiet.events] == ["StatusEvent"]
    assert quiet.previous_watermark == watermark and quiet.more_events is False

    iids = [add_item(ews, "room1@contoso.com", f"booking {i}", hours=i) for i in range(30)]
    # 60 events (Created + FreeBusyChanged per item): 50 per notification, MoreEvents until the queue is empty.
    # exchangelib repeats the first watermark while MoreEvents is true; the server delivers from its own queue.
    notes = list(room.calendar.get_events(sid, watermark))
    assert [len(n.events) for n in notes] == [50, 10]
    assert [n.more_events for n in notes] == [True, False]
    events = events_of(notes)
    created = [e.item_id.id for e in events if type(e).__name__ == "CreatedEvent"]
    assert created == [item_id(ews, "room1@contoso.com", i) for i in iids]
    marks = [e.watermark for e in events]
    assert all(marks) and len(set(marks)) == 60
    assert notes[1].previous_watermark == events[49].watermark

    # Nothing new: a StatusEvent at the last watermark delivered.
    (again,) = list(room.calendar.get_events(sid, events[-1].watermark))
    assert [type(e).__name__ for e in again.events] == ["StatusEvent"]
    assert again.events[0].watermark == events[-1].watermark

    with pytest.raises(ErrorInvalidWatermark):
        list(room.calendar.get_events(sid, "bm90IGEgd2F0ZXJtYXJr"))


class _PullWithWatermark(SubscribeToPull):
    """SubscribeToPull with the watermark in the types namespace, where the schema (and the EWS Managed API) put
    it: exchangelib 5.6 writes m:Watermark, which a schema-validating server refuses."""

    def get_payload(self, folders: Any, event_types: Any, watermark: Any, timeout: Any) -> Any:
        payload = create_element(f"m:{self.SERVICE_NAME}")
        request_elem = self._partial_payload(folders=folders, event_types=event_types)
        if watermark:
            add_xml_child(request_elem, "t:Watermark", watermark)
        add_xml_child(request_elem, "t:Timeout", timeout)
        payload.append(request_elem)
        return payload


def test_pull_subscribe_with_a_watermark_replays_from_the_event_table(ews: Any) -> None:
    room = ews.room("room1@contoso.com")
    _, mark = room.calendar.subscribe_to_pull(timeout=10)
    first = add_item(ews, "room1@contoso.com", "first")
    ews.call(ews.sim.restart)  # subscriptions are lost; the mailbox's event table is not

    with pytest.raises(ErrorSchemaValidation):  # exchangelib's own request puts Watermark in the wrong namespace
        room.calendar.subscribe_to_pull(watermark=mark, timeout=10)

    (sid, start), = _PullWithWatermark(account=room).call(
        folders=[room.calendar], event_types=SubscribeToPull.EVENT_TYPES, watermark=mark, timeout=10)
    assert start == mark
    notes = list(room.calendar.get_events(sid, start))
    assert [type(e).__name__ for e in events_of(notes)] == ["CreatedEvent", "FreeBusyChangedEvent"]
    assert events_of(notes)[0].item_id.id == item_id(ews, "room1@contoso.com", first)


def test_pull_subscription_expires_without_get_events(sim_factory: Any) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, pull_minute=0.2))
    room = ews.room("room1@contoso.com")
    sid, watermark = room.calendar.subscribe_to_pull(timeout=1)
    list(room.calendar.get_events(sid, watermark))  # resets the timer

    def expired() -> bool:
        hub = ews.sim.notifications
        return bool(ews.call(lambda: hub._is_expired(hub.subscriptions[sid])))

    wait_for(expired, what="the subscription's Timeout to pass")
    with pytest.raises(ErrorExpiredSubscription):
        list(room.calendar.get_events(sid, watermark))
    with pytest.raises(ErrorExpiredSubscription):  # remembered as expired, not merely unknown
        list(room.calendar.get_events(sid, watermark))
    with pytest.raises(ErrorSubscriptionNotFound):
        list(room.calendar.get_events("JABFWDE2TUJYMDEuY29udG9zby5jb20QAAAAAAAAAAAAAAAAAAAAAAAAAAAA", watermark))


def test_unsubscribe(ews: Any) -> None:
    room = ews.room("room1@contoso.com")
    streaming = room.calendar.subscribe_to_streaming()
    pull, watermark = room.calendar.subscribe_to_pull(timeout=10)
    assert room.calendar.unsubscribe(streaming) is True
    assert room.calendar.unsubscribe(pull) is True
    with pytest.raises(ErrorSubscriptionNotFound):
        list(room.calendar.get_streaming_events(streaming, connection_timeout=1))
    with pytest.raises(ErrorSubscriptionNotFound):
        list(room.calendar.get_events(pull, watermark))
    with pytest.raises(ErrorSubscriptionNotFound):
        room.calendar.unsubscribe(streaming)
    # The context-manager form subscribes and unsubscribes.
    with room.calendar.streaming_subscription() as sid:
        assert ews.call(lambda: sid in ews.sim.notifications.subscriptions)
    assert not ews.call(lambda: sid in ews.sim.notifications.subscriptions)


def test_all_folders_subscription_and_event_type_filter(ews: Any) -> None:
    room = ews.room("room1@contoso.com")
    everything, mark_all = room.subscribe_to_pull(timeout=10)  # SubscribeToAllFolders
    created_only, mark_created = room.calendar.subscribe_to_pull(event_types=["CreatedEvent"], timeout=10)
    iid = add_item(ews, "room1@contoso.com", "soft deleted")
    ews.call(lambda: ews.sim.directory.remove_item(ews.sim.directory.item(iid), "MoveToDeletedItems"))

    kinds = [type(e).__name__ for e in events_of(list(room.calendar.get_events(everything, mark_all)))]
    assert kinds == ["CreatedEvent", "FreeBusyChangedEvent", "MovedEvent", "FreeBusyChangedEvent"]
    moved = [e for e in events_of(list(room.calendar.get_events(created_only, mark_created)))]
    assert [type(e).__name__ for e in moved] == ["CreatedEvent"]
