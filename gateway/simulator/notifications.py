"""Subscriptions and their event queues, as an Exchange 2016 Mailbox server keeps them (streaming and pull).

The model, and where it comes from (docs/exchange-semantics.md sections 1.1-1.4; MS docs for Subscribe, GetEvents
and GetStreamingEvents):

- Every mailbox has an event table: each change gets the next number of a per-mailbox counter. A watermark names
  a position in that table (it is opaque base64 here, as on the wire), so a pull subscription created with an old
  watermark is filled from the table. The table survives an app-pool recycle; subscriptions do not.
- A subscription lives in memory on one backend (mailbox server): the one its Subscribe request was routed to
  (X-BackEndOverrideCookie, else X-AnchorMailbox, else the impersonated mailbox). A GetEvents / GetStreamingEvents /
  Unsubscribe routed to another backend does not know it: ErrorSubscriptionNotFound. That is what grouping
  mailboxes of different servers into one stream without the anchor's affinity cookie gets on real Exchange.
- Events are queued per subscription and taken off the queue when delivered, at most 50 per notification
  (GetEvents / GetStreamingEvents remarks). The GetEvents watermark is validated but does not rewind the queue:
  the server's own "last watermark" moves when it delivers, which is also what exchangelib's ``get_events`` loop
  relies on (it repeats the first watermark while MoreEvents is true).
- Streaming notifications carry no watermarks (the MS sample shows none; streaming cannot be resumed); pull
  notifications do, with PreviousWatermark and MoreEvents, and a StatusEvent when nothing happened.
- A streaming connection is one chunked HTTP response; every write is a complete SOAP envelope: notifications,
  keep-alives (ConnectionStatus OK every ``keepalive_seconds``) and finally ConnectionStatus Closed when the
  ConnectionTimeout (in minutes of ``stream_minute`` real seconds) is up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import secrets
import struct
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from lxml import etree

from gateway.simulator import ids, schema
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import EwsError, Responses, envelope, sub

if TYPE_CHECKING:
    from gateway.simulator.calendar import CalendarItem
    from gateway.simulator.mailboxes import Folder, Mailbox
    from gateway.simulator.ops import Context
    from gateway.simulator.server import Simulator

log = structlog.get_logger("gateway.simulator.notifications")

EVENT_TYPES = ("CopiedEvent", "CreatedEvent", "DeletedEvent", "ModifiedEvent", "MovedEvent", "NewMailEvent",
               "FreeBusyChangedEvent")
EVENTS_PER_NOTIFICATION = 50  # "the first 50 events from the queue are pulled" (GetEvents/GetStreamingEvents)
MAX_IDS_PER_STREAM = 200  # how-to-maintain-affinity..., step 7
MAX_SUBSCRIPTIONS_PER_MAILBOX = 5000  # EWSMaxSubscriptions, charged to the target mailbox when impersonating
STREAMING_IDLE_MINUTES = 30  # an unconnected streaming subscription is dropped after this (UNVERIFIED figure)
QUEUE_LIMIT = 5000  # events held per subscription before it is marked as having missed events
LOG_LIMIT = 10000  # events per mailbox kept for Subscribe-with-Watermark
EXPIRED_MEMORY = 1000  # expired pull subscription ids remembered for ErrorExpiredSubscription
AFFINITY_COOKIE = "X-BackEndOverrideCookie"
_COOKIE_VERSION = "1942127330"  # the "~version" tail real cookies carry; cosmetic

_WM_MAGIC = b"\x01WM"
_SUB_TAIL = struct.pack("<I", 16)


# -- identities on the wire ------------------------------------------------------------------------------
def backend_fqdn(sim: Simulator, backend: int) -> str:
    return f"EX16MBX{backend + 1:02d}.{sim.config.domain}".lower()


def affinity_cookie(sim: Simulator, backend: int) -> str:
    """The X-BackEndOverrideCookie value for a backend: 'server~version', as Exchange 2013+ writes it."""
    return f"{backend_fqdn(sim, backend)}~{_COOKIE_VERSION}"


def backend_of_cookie(sim: Simulator, value: str | None) -> int | None:
    if not value:
        return None
    server = value.strip().strip('"').split("~", 1)[0].lower()
    for n in range(sim.directory.backends):
        if backend_fqdn(sim, n) == server:
            return n
    return None  # a cookie naming no known server is ignored, and routing falls back to the anchor


def route(ctx: Context) -> int:
    """The backend a request lands on: its affinity cookie's, else its anchor mailbox's, else the target's."""
    headers = ctx.request.headers
    for value in (headers.get(AFFINITY_COOKIE), ctx.request.cookies.get(AFFINITY_COOKIE)):
        backend = backend_of_cookie(ctx.sim, value)
        if backend is not None:
            return backend
    anchor = headers.get("X-AnchorMailbox", "").strip()
    if anchor:
        mb = ctx.directory.find(anchor)
        if mb is not None:
            return int(mb.backend)
    return int(ctx.mailbox.backend)


def prefers_affinity(ctx: Context) -> bool:
    return ctx.request.headers.get("X-PreferServerAffinity", "").strip().lower() == "true"


def new_subscription_id(sim: Simulator, backend: int) -> str:
    """Like Exchange's: the hosting server's FQDN, then a GUID (so ids are opaque but name their server)."""
    fqdn = backend_fqdn(sim, backend).encode()
    return base64.b64encode(struct.pack("<H", len(fqdn)) + fqdn + _SUB_TAIL + secrets.token_bytes(16)).decode()


def encode_watermark(mailbox_idx: int, counter: int) -> str:
    raw = _WM_MAGIC + struct.pack(">IQ", mailbox_idx, counter)
    return base64.b64encode(raw + struct.pack(">I", zlib.crc32(raw))).decode()


def decode_watermark(value: str) -> tuple[int, int]:
    try:
        raw = base64.b64decode(value.strip().encode(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EwsError("ErrorInvalidWatermark", "The watermark is invalid.") from e
    if len(raw) != len(_WM_MAGIC) + 16 or not raw.startswith(_WM_MAGIC):
        raise EwsError("ErrorInvalidWatermark", "The watermark is invalid.")
    body, crc = raw[:-4], struct.unpack(">I", raw[-4:])[0]
    if zlib.crc32(body) != crc:
        raise EwsError("ErrorInvalidWatermark", "The watermark is invalid.")
    idx, counter = struct.unpack(">IQ", body[len(_WM_MAGIC):])
    return int(idx), int(counter)


# -- events ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Event:
    kind: str
    mailbox: int
    counter: int
    timestamp: datetime
    folder_no: int
    parent: tuple[str, str]
    item: tuple[str, str | None] | None  # (Id, ChangeKey); None for a StatusEvent
    old_folder_no: int | None = None
    old_parent: tuple[str, str] | None = None
    old_item: tuple[str, str | None] | None = None

    @property
    def watermark(self) -> str:
        return encode_watermark(self.mailbox, self.counter)


def render_event(parent: etree._Element, ev: Event, *, watermark: bool) -> None:
    """One t:*Event in NotificationType, children in schema order."""
    el = sub(parent, f"t:{ev.kind}")
    if watermark:
        sub(el, "t:Watermark", ev.watermark)
    if ev.kind == "StatusEvent":
        return
    sub(el, "t:TimeStamp", ev.timestamp)
    if ev.item is not None:
        sub(el, "t:ItemId", Id=ev.item[0], ChangeKey=ev.item[1])
    sub(el, "t:ParentFolderId", Id=ev.parent[0], ChangeKey=ev.parent[1])
    if ev.kind in ("MovedEvent", "CopiedEvent"):
        if ev.old_item is not None:
            sub(el, "t:OldItemId", Id=ev.old_item[0], ChangeKey=ev.old_item[1])
        if ev.old_parent is not None:
            sub(el, "t:OldParentFolderId", Id=ev.old_parent[0], ChangeKey=ev.old_parent[1])


# -- subscriptions -------------------------------------------------------------------------------------
class Subscription:
    __slots__ = ("backend", "counter", "created", "event_types", "folders", "id", "kind", "mailbox", "missed",
                 "principal", "queue", "stream", "timeout", "touched")

    def __init__(self, sid: str, kind: str, mailbox: Mailbox, principal: Mailbox, backend: int,
                 folders: frozenset[int] | None, event_types: frozenset[str], timeout: int, counter: int) -> None:
        self.id = sid
        self.kind = kind  # "streaming" or "pull"
        self.mailbox = mailbox
        self.principal = principal
        self.backend = backend
        self.folders = folders  # folder numbers of self.mailbox, or None for SubscribeToAllFolders
        self.event_types = event_types
        self.timeout = timeout  # minutes (pull)
        self.counter = counter  # the server-side "last watermark" of this subscription
        self.queue: deque[Event] = deque()
        self.stream: Stream | None = None
        self.created = time.monotonic()
        self.touched = self.created
        self.missed = False

    def wants(self, ev: Event) -> bool:
        if ev.kind not in self.event_types:
            return False
        if self.folders is None:
            return True
        return ev.folder_no in self.folders or (ev.old_folder_no is not None and ev.old_folder_no in self.folders)


class NotificationHub:
    """Every subscription of the organisation, the mailboxes' event tables and the open streaming connections."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.subscriptions: dict[str, Subscription] = {}
        self.by_mailbox: dict[int, dict[str, Subscription]] = {}
        self.expired: OrderedDict[str, str] = OrderedDict()  # id -> kind, for ErrorExpiredSubscription
        self._swept = -1e9  # when sweep() last looked at every subscription (monotonic)
        self.streams: set[Stream] = set()
        self.counters: dict[int, int] = {}
        self.logs: dict[int, deque[Event]] = {}
        self.versions: dict[int, int] = {}  # iid -> last ChangeKey version seen, for events about deleted items
        self.delivered = 0  # events handed to clients (both kinds)
        sim.directory.listeners.append(self._on_change)

    # -- directory listener --------------------------------------------------------------------------
    def _on_change(self, kind: str, folder: Folder, item: CalendarItem | None, iid: int, old_folder: Folder | None,
                   old_iid: int | None) -> None:
        mb = folder.mailbox
        if item is not None:
            self.versions[item.iid] = item.version
        if kind == "DeletedEvent":
            version = self.versions.pop(iid, None)
        else:
            version = item.version if item is not None else self.versions.get(iid)
        item_ref = (ids.item_id(mb.idx, iid), ids.change_key(iid, version) if version is not None else None)
        old_ref = None
        if old_iid is not None and old_folder is not None:
            old_version = self.versions.pop(old_iid, None) if old_iid != iid else version
            old_ref = (ids.item_id(old_folder.mailbox.idx, old_iid),
                       ids.change_key(old_iid, old_version) if old_version is not None else None)
        kinds = [kind]
        if kind == "CreatedEvent" and folder.distinguished == "inbox":
            kinds.append("NewMailEvent")  # a message arriving in the Inbox is also new mail
        now = datetime.now(UTC).replace(microsecond=0)
        for k in kinds:
            ev = Event(k, mb.idx, self._next_counter(mb.idx), now, folder.no, (folder.id, folder.change_key),
                       item_ref, old_folder.no if old_folder is not None else None,
                       (old_folder.id, old_folder.change_key) if old_folder is not None else None, old_ref)
            self._publish(ev)

    def _next_counter(self, mailbox_idx: int) -> int:
        value = self.counters.get(mailbox_idx, 0) + 1
        self.counters[mailbox_idx] = value
        return value

    def _publish(self, ev: Event) -> None:
        log_ = self.logs.get(ev.mailbox)
        if log_ is None:
            log_ = self.logs[ev.mailbox] = deque(maxlen=LOG_LIMIT)
        log_.append(ev)
        for s in list(self.by_mailbox.get(ev.mailbox, {}).values()):
            if not s.wants(ev) or s.missed:
                continue
            if len(s.queue) >= QUEUE_LIMIT:
                s.queue.clear()
                s.missed = True  # the next delivery attempt reports ErrorMissedNotificationEvents
            else:
                s.queue.append(ev)
            if s.stream is not None:
                s.stream.wake.set()

    def watermark(self, mailbox: Mailbox) -> str:
        """The mailbox's current position: what Subscribe hands out."""
        return encode_watermark(mailbox.idx, self.counters.get(mailbox.idx, 0))

    # -- subscribe / find / unsubscribe ----------------------------------------------------------------
    def subscribe(self, kind: str, mailbox: Mailbox, principal: Mailbox, backend: int, folders: frozenset[int] | None,
                  event_types: Iterable[str], *, timeout: int = 0, watermark: str | None = None) -> Subscription:
        self.sweep(mailbox)
        if len(self.by_mailbox.get(mailbox.idx, {})) >= MAX_SUBSCRIPTIONS_PER_MAILBOX:
            raise EwsError("ErrorExceededSubscriptionCount",
                           "You have exceeded the maximum number of subscriptions for this mailbox.")
        start = self.counters.get(mailbox.idx, 0)
        backlog: list[Event] = []
        if watermark is not None:
            idx, counter = decode_watermark(watermark)
            if idx != mailbox.idx or counter > start:
                raise EwsError("ErrorInvalidWatermark", "The watermark is invalid for this mailbox.")
            if counter < start:
                table = self.logs.get(mailbox.idx, deque())
                if not table or table[0].counter > counter + 1:
                    raise EwsError("ErrorInvalidWatermark",
                                   "The watermark is too old: its events are no longer in the event table.")
                backlog = [ev for ev in table if ev.counter > counter]
            start = counter
        s = Subscription(new_subscription_id(self.sim, backend), kind, mailbox, principal, backend, folders,
                         frozenset(event_types), timeout, start)
        s.queue.extend(ev for ev in backlog if s.wants(ev))
        self.subscriptions[s.id] = s
        self.by_mailbox.setdefault(mailbox.idx, {})[s.id] = s
        log.info("notifications.subscribed", id=s.id[-12:], kind=kind, mailbox=mailbox.smtp, backend=backend)
        return s

    def find(self, sid: str, backend: int, principal: Mailbox) -> Subscription:
        """The subscription ``sid`` as seen from ``backend`` (expiring it if its time is up)."""
        s = self.subscriptions.get(sid)
        if s is not None and self._is_expired(s):
            self._drop(s, expired=True)
            s = None
        if s is None:
            if sid in self.expired and self.expired[sid] == "pull":
                raise EwsError("ErrorExpiredSubscription", "The subscription has expired.")
            raise EwsError("ErrorSubscriptionNotFound", "The specified subscription was not found.")
        if s.backend != backend:
            # Subscriptions are held in memory by the mailbox server that created them; this one has never heard of
            # it (a request without affinity landed on another server).
            raise EwsError("ErrorSubscriptionNotFound", "The specified subscription was not found.")
        if s.principal is not principal:
            raise EwsError("ErrorSubscriptionAccessDenied",
                           "Access is denied. Only the subscription owner may access the subscription.")
        return s

    def unsubscribe(self, s: Subscription) -> None:
        self._drop(s, expired=False, code=None)

    def _is_expired(self, s: Subscription) -> bool:
        now = time.monotonic()
        if s.kind == "pull":
            return now - s.touched > s.timeout * self.sim.config.pull_minute
        return s.stream is None and now - s.touched > STREAMING_IDLE_MINUTES * self.sim.config.stream_minute

    def _drop(self, s: Subscription, *, expired: bool, code: str | None = "ErrorSubscriptionNotFound") -> None:
        """Forget ``s``. An open stream carrying it reports ``code`` for it, or (None) just stops carrying it and
        ends with ConnectionStatus Closed when nothing is left."""
        self.subscriptions.pop(s.id, None)
        per_mb = self.by_mailbox.get(s.mailbox.idx)
        if per_mb is not None:
            per_mb.pop(s.id, None)
            if not per_mb:
                del self.by_mailbox[s.mailbox.idx]
        if expired:
            self.expired[s.id] = s.kind
            while len(self.expired) > EXPIRED_MEMORY:
                self.expired.popitem(last=False)
        if s.stream is not None:
            stream, s.stream = s.stream, None
            if code is None:
                stream.release(s)
            else:
                stream.lose(s, code, "The subscription has expired." if expired else "The subscription was removed.")

    def sweep(self, mailbox: Mailbox | None = None) -> None:
        """Drop the subscriptions whose time is up: ``mailbox``'s now, everyone's at most once a second (a sweep of
        all on every Subscribe made subscribing N rooms cost N² checks). Until then ``find`` expires them one by one.
        """
        now = time.monotonic()
        if now - self._swept >= 1.0:
            self._swept = now
            candidates = list(self.subscriptions.values())
        else:
            candidates = list(self.by_mailbox.get(mailbox.idx, {}).values()) if mailbox is not None else []
        for s in candidates:
            if self._is_expired(s):
                self._drop(s, expired=True)

    # -- pull ----------------------------------------------------------------------------------------------
    def get_events(self, s: Subscription, watermark: str) -> tuple[str, list[Event], bool]:
        """Take up to 50 events off a pull subscription's queue: (previous watermark, events, more events)."""
        idx, counter = decode_watermark(watermark)
        if idx != s.mailbox.idx or counter > self.counters.get(idx, 0):
            raise EwsError("ErrorInvalidWatermark", "The watermark is invalid for this subscription.")
        s.touched = time.monotonic()
        if s.missed:
            self._drop(s, expired=False)
            raise EwsError("ErrorMissedNotificationEvents",
                           "Events were lost because the subscription's queue overflowed. Resubscribe and resync.")
        previous = encode_watermark(s.mailbox.idx, s.counter)
        batch = [s.queue.popleft() for _ in range(min(EVENTS_PER_NOTIFICATION, len(s.queue)))]
        if batch:
            s.counter = batch[-1].counter
            self.delivered += len(batch)
        return previous, batch, bool(s.queue)

    def status_event(self, s: Subscription) -> Event:
        folder = s.mailbox.calendar
        return Event("StatusEvent", s.mailbox.idx, s.counter, datetime.now(UTC), folder.no,
                     (folder.id, folder.change_key), None)

    # -- streaming -------------------------------------------------------------------------------------
    def open_stream(self, ctx: Context, subs: list[Subscription], timeout_minutes: int) -> Stream:
        """Reserve a hanging connection for ``subs`` (charged to the impersonated mailbox's budget clone)."""
        account = ctx.mailbox.smtp
        self.sim.throttle.open_stream(account)
        stream = Stream(self, ctx, account, timeout_minutes)
        self.streams.add(stream)
        for s in subs:
            older = s.stream
            if older is not None and older is not stream:
                older.lose(s, "ErrorNewEventStreamConnectionOpened",
                           "A new GetStreamingEvents connection was opened for this subscription.")
            s.stream = stream
            stream.subs[s.id] = s
        return stream

    def _stream_closed(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self.sim.throttle.close_stream(stream.account)
        now = time.monotonic()
        for s in stream.subs.values():
            if s.stream is stream:
                s.stream = None
                s.touched = now  # the idle clock of an unconnected streaming subscription starts now
        stream.subs.clear()

    # -- fault injection and lifecycle -------------------------------------------------------------------
    def expire(self, subscription_ids: Iterable[str] | None = None) -> list[str]:
        """Expire subscriptions now (all when ``subscription_ids`` is None); open streams report them as lost."""
        chosen = list(self.subscriptions.values()) if subscription_ids is None else [
            self.subscriptions[i] for i in subscription_ids if i in self.subscriptions]
        for s in chosen:
            self._drop(s, expired=True)
        return [s.id for s in chosen]

    def reset_streams(self) -> int:
        """Abort every open streaming connection mid-stream: the transport closes without a chunked end."""
        streams = list(self.streams)
        for stream in streams:
            stream.abort()
        return len(streams)

    def restart(self) -> None:
        """An app-pool recycle: every subscription is lost and open streams die; event tables survive."""
        for stream in list(self.streams):
            stream.abort()
        self.subscriptions.clear()
        self.by_mailbox.clear()
        self.expired.clear()

    def close_all(self) -> None:
        """Server shutdown: end every open stream with ConnectionStatus Closed."""
        for stream in list(self.streams):
            stream.close()


class Stream:
    """One GetStreamingEvents connection: a chunked HTTP response written one SOAP envelope at a time."""

    def __init__(self, hub: NotificationHub, ctx: Context, account: str, timeout_minutes: int) -> None:
        self.hub = hub
        self.ctx = ctx
        self.request = ctx.request
        self.account = account
        self.timeout_minutes = timeout_minutes
        self.generation = hub.sim.generation
        self.subs: dict[str, Subscription] = {}
        self.wake = asyncio.Event()
        self.closing = False
        self.aborted = False
        self.lost: list[tuple[str, str, str]] = []  # (code, text, subscription id)
        self.keepalives = 0
        self.notifications = 0
        self.envelopes = 0

    # called from the hub ----------------------------------------------------------------------------------
    def lose(self, s: Subscription, code: str, text: str) -> None:
        self.subs.pop(s.id, None)
        if s.stream is self:
            s.stream = None
        self.lost.append((code, text, s.id))
        self.wake.set()

    def release(self, s: Subscription) -> None:
        self.subs.pop(s.id, None)
        if s.stream is self:
            s.stream = None
        self.wake.set()

    def close(self) -> None:
        self.closing = True
        self.wake.set()

    def abort(self) -> None:
        self.aborted = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self.wake.set()

    # the connection -------------------------------------------------------------------------------------
    async def serve(self) -> web.StreamResponse:
        sim = self.hub.sim
        config = sim.config
        resp = web.StreamResponse(status=200, reason="OK")
        resp.content_type = "text/xml"
        resp.charset = "utf-8"
        resp.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        clean = False
        # A hanging connection counts against HangingConnectionLimit, not EWSMaxConcurrency: give back the
        # concurrency slot the dispatcher took for this request while the stream is open.
        active = sim.throttle.active
        principal = self.ctx.principal.smtp
        active[principal] -= 1
        try:
            await resp.prepare(self.request)
            await resp.write(b"")  # send the headers now; exchangelib's requests.post() returns on them
            deadline = loop.time() + self.timeout_minutes * config.stream_minute
            next_keepalive = loop.time() + config.keepalive_seconds
            while True:
                if self.aborted or sim.generation != self.generation:
                    self.abort()
                    break
                self.wake.clear()
                if self.lost:
                    lost, self.lost = self.lost, []
                    if await self._send_lost(resp, lost):
                        clean = True
                        break
                batch = self._collect()
                if batch:
                    await resp.write(self._envelope(notifications=batch))
                    self.notifications += len(batch)
                    if any(s.queue for s in self.subs.values()):
                        self.wake.set()  # more than 50 were waiting: the next notification goes out at once
                if self.lost:
                    continue  # a subscription was dropped while collecting: report it first
                if self.closing or not self.subs:
                    await resp.write(self._envelope(status="Closed"))
                    clean = True
                    break
                now = loop.time()
                if now >= deadline:
                    await resp.write(self._envelope(status="Closed"))
                    clean = True
                    break
                if now >= next_keepalive:
                    await resp.write(self._envelope(status="OK"))
                    self.keepalives += 1
                    next_keepalive = now + config.keepalive_seconds
                if self.wake.is_set():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, min(deadline, next_keepalive) - now))
        except ConnectionError:
            clean = False  # the client went away (or the transport was aborted under us)
        finally:
            active[principal] += 1
            self.hub._stream_closed(self)
        if clean:
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
        return resp

    def _collect(self) -> list[tuple[Subscription, list[Event]]]:
        batch: list[tuple[Subscription, list[Event]]] = []
        for s in list(self.subs.values()):
            if s.missed:
                self.hub._drop(s, expired=False, code="ErrorMissedNotificationEvents")
                continue
            if s.queue:
                events = [s.queue.popleft() for _ in range(min(EVENTS_PER_NOTIFICATION, len(s.queue)))]
                s.counter = events[-1].counter
                s.touched = time.monotonic()
                self.hub.delivered += len(events)
                batch.append((s, events))
        return batch

    async def _send_lost(self, resp: web.StreamResponse, lost: list[tuple[str, str, str]]) -> bool:
        """Report subscriptions taken from this stream, one error message per code; True when the stream is over."""
        by_code: dict[str, tuple[str, list[str]]] = {}
        for code, text, sid in lost:
            by_code.setdefault(code, (text, []))[1].append(sid)
        items = list(by_code.items())
        for n, (code, (text, sids)) in enumerate(items):
            last = n == len(items) - 1
            status = "Closed" if last and not self.subs else "OK"
            await resp.write(self._envelope(error=EwsError(code, text), error_ids=sids, status=status))
        return not self.subs

    def _envelope(self, *, notifications: list[tuple[Subscription, list[Event]]] | None = None,
                  error: EwsError | None = None, error_ids: list[str] | None = None,
                  status: str | None = None) -> bytes:
        self.envelopes += 1
        return streaming_envelope(self.hub.sim, notifications=notifications, error=error, error_ids=error_ids,
                                  status=status)


def streaming_response(notifications: list[tuple[Subscription, list[Event]]] | None = None,
                       error: EwsError | None = None, error_ids: list[str] | None = None,
                       status: str | None = None) -> etree._Element:
    """A GetStreamingEventsResponse as Exchange writes it on the wire (m:Notification, m:SubscriptionId)."""
    out = Responses("GetStreamingEvents")
    msg = out.error(error) if error is not None else out.success()
    if notifications:
        container = sub(msg, "m:Notifications")
        for s, events in notifications:
            note = sub(container, "m:Notification")
            sub(note, "t:SubscriptionId", s.id)
            for ev in events:
                render_event(note, ev, watermark=False)
    if error_ids:
        eids = sub(msg, "m:ErrorSubscriptionIds")
        for sid in error_ids:
            sub(eids, "m:SubscriptionId", sid)
    if status is not None:
        sub(msg, "m:ConnectionStatus", status)
    return out.root


def schema_view(root: etree._Element) -> etree._Element:
    """The response with the two documented wire-vs-schema differences undone, for validation.

    messages.xsd types m:Notifications and m:ErrorSubscriptionIds as t:NonEmptyArrayOf...Type, whose children
    are t:Notification and t:SubscriptionId. Real Exchange servers write m:Notification (MS sample in
    getstreamingevents-operation.md) and m:SubscriptionId (the "SubscriptionId (GetEvents)" element, which is
    in the messages namespace) instead, and clients follow the wire: exchangelib reads every child of
    m:Notifications whatever its namespace, and looks for **m:**SubscriptionId in ErrorSubscriptionIds
    (services/get_streaming_events.py), so with t: it would not list the failed ids. The simulator therefore
    writes the wire form and validates everything else by checking this renamed copy.
    """
    view = copy.deepcopy(root)
    for container, child in (("Notifications", "Notification"), ("ErrorSubscriptionIds", "SubscriptionId")):
        for parent in view.iter(f"{{{MNS}}}{container}"):
            for el in parent:
                if el.tag == f"{{{MNS}}}{child}":
                    el.tag = f"{{{TNS}}}{child}"
    return view


def streaming_envelope(sim: Simulator, **kwargs: Any) -> bytes:
    root = streaming_response(**kwargs)
    if sim.config.validate_responses:
        problem = schema.validate(schema_view(root))
        if problem:
            log.error("simulator.invalid_response", operation="GetStreamingEvents", problem=problem)
            root = streaming_response(error=EwsError(
                "ErrorInternalServerError", f"simulator bug: response violates the EWS schema: {problem}"),
                status="Closed")
    return envelope([root])
