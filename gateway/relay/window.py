"""The outbox on its way to the hub: what was sent and not yet acknowledged, what to send again after a reconnect,
and the acknowledgements recorded in the store (docs/relay-protocol.md, section 6).

At most ``window`` events are unacknowledged at once; they go out in ``events`` messages of up to
``protocol.MAX_BATCH`` events, each below the frame limit. Events sent and not acknowledged stay encoded in memory
and are resent from there after a reconnect, so a resume does not re-read and re-encode them. The hub's
acknowledgement (``welcome.ack``) is the truth for what it has: sending restarts right after it, even when the
store recorded a higher ack (a hub restored from a backup lost those events and must get them again; store.ack
never moves backwards, so the local record is not lowered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

import aiohttp
import structlog

from gateway.errors import ProtocolError
from gateway.observability.metrics import Metrics
from gateway.ports import OutboxEntry, Store
from gateway.relay import protocol
from gateway.retry import Backoff

log = structlog.get_logger(__name__)

POLL_SECONDS: Final = 5.0  # re-read the outbox this often even without a notification (other writers)
FRAME_BUDGET: Final = protocol.MAX_MESSAGE_BYTES - 1024  # room for the envelope
_EVENTS_HEAD: Final = '{"type":"events","events":['
_EVENTS_TAIL: Final = "]}"
_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


class OutboxWindow:
    def __init__(self, store: Store, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.cursor: int | None = None  # the highest seq read from the outbox (None: take the hub's ack)
        self.unacked: deque[tuple[int, str]] = deque()  # sent on this session, not acknowledged
        self.resend: deque[tuple[int, str]] = deque()  # from an earlier session, to send again
        self.sent_max = 0
        self.acked = 0  # the hub's acknowledgement, as last heard
        self.stored_ack = 0  # what the store has recorded through this window
        self.window_open = asyncio.Event()
        self.ack_due = asyncio.Event()

    def last_seq(self) -> int:
        """The highest seq this gateway has written (hello.last_seq). Blocking: call it in a thread."""
        last = getattr(self.store, "last_seq", None)
        if callable(last):
            return int(last())
        return max(self.cursor or 0, self.acked)

    def resume(self, hub_ack: int) -> None:
        """Line the outgoing stream up with what the hub has (its ack is the truth)."""
        if hub_ack < self.acked:
            log.warning("tunnel.hub_ack_went_back", hub_ack=hub_ack, previous_ack=self.acked,
                        why="the hub lost events it had acknowledged (restored?); they are sent again")
        # Invariant: every outbox entry in (self.acked, self.cursor] is in unacked + resend, in order.
        pending = deque(self.unacked)
        pending.extend(self.resend)
        self.unacked.clear()
        if self.cursor is None or hub_ack < self.acked or hub_ack >= self.cursor:
            pending.clear()  # nothing cached covers what the hub needs: read the outbox from its ack
            self.cursor = hub_ack
        while pending and pending[0][0] <= hub_ack:
            pending.popleft()
        self.resend = pending
        self.sent_max = hub_ack
        self.acked = hub_ack
        self.ack_due.set()
        self.window_open.set()
        if self.metrics is not None:
            self.metrics.tunnel_acked_seq.set(hub_ack)

    def on_ack(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError("ack.seq must be an integer >= 0", key="bad_message")
        if seq <= self.acked:
            return
        if seq > self.sent_max:
            log.warning("tunnel.ack_ahead", seq=seq, sent=self.sent_max)
            seq = self.sent_max  # never record more than was sent
            if seq <= self.acked:
                return
        self.acked = seq
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        self.window_open.set()
        self.ack_due.set()
        if self.metrics is not None:
            self.metrics.tunnel_acked_seq.set(seq)

    async def record_acks(self) -> None:
        """Record acknowledgements in the store, one write per burst (acks arrive faster than fsyncs). A failed
        write is tried again after a back-off, with the newest ack by then."""
        refused = False
        failing = Backoff(base=0.5, cap=10.0)
        while True:
            await self.ack_due.wait()
            self.ack_due.clear()
            seq = self.acked
            if seq <= self.stored_ack:
                continue
            try:
                await asyncio.to_thread(self.store.ack, seq)
            except ProtocolError as e:
                # the hub acknowledges events this store never issued (a restored gateway backup): say it once
                if not refused:
                    log.error("tunnel.ack_not_recorded", seq=seq, reason=e.key, error=str(e),
                              remedy="the hub has more of this gateway's events than its store ever wrote; "
                                     "ask the hub operator to reset this gateway's stream")
                refused = True
                self.stored_ack = seq  # do not retry the same value
                continue
            except Exception as e:
                if not failing.failures:
                    log.error("tunnel.ack_not_recorded", seq=seq, error=f"{e.__class__.__name__}: {e}")
                await asyncio.sleep(failing.next())
                self.ack_due.set()
                continue
            if failing.failures:
                log.info("tunnel.ack_recorded_again", seq=seq, after_failures=failing.failures)
            failing.reset()
            self.stored_ack = seq
            refused = False

    async def send(self, ws: aiohttp.ClientWebSocketResponse, size: int, wake: asyncio.Event | None) -> None:
        """Send the outbox, at most ``size`` events unacknowledged, until the connection fails (raises)."""
        while True:
            room = size - len(self.unacked)
            if room <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            limit = min(room, protocol.MAX_BATCH)
            if self.resend:
                batch = [self.resend.popleft() for _ in range(min(limit, len(self.resend)))]
            else:
                if wake is not None:
                    wake.clear()  # before reading: a commit after this read sets it again
                assert self.cursor is not None
                batch, last = await asyncio.to_thread(self._read_encoded, self.cursor, limit)
                if last is None:
                    await _wait_for_events(wake)
                    continue
                self.cursor = last
                if not batch:
                    continue
            # In flight from here (no await since the batch was taken): if a send fails or the session ends
            # halfway, resume() finds every one of them and they go out again.
            self.unacked.extend(batch)
            for chunk in frames(batch):
                await ws.send_str(_EVENTS_HEAD + ",".join(f for _, f in chunk) + _EVENTS_TAIL)
                self.sent_max = chunk[-1][0]
                if self.metrics is not None:
                    self.metrics.tunnel_events.inc(len(chunk))

    def _read_encoded(self, after: int, limit: int) -> tuple[list[tuple[int, str]], int | None]:
        """(encoded events after ``after``, the last seq read or None when there was none) — in a worker thread,
        encoding included, so the event loop only joins strings."""
        entries = self.store.outbox_texts_after(after, limit=limit)
        if not entries:
            return [], None
        out = []
        for e in entries:
            frag = _element(e.seq, e.room_seq, e.cloudevent)
            # (ASCII, as the gateway writes every event: its length is its size; another text is measured)
            if (len(frag) if frag.isascii() else len(frag.encode())) > FRAME_BUDGET:
                # it could never be sent; holding it would stop the stream for good
                log.error("tunnel.event_too_large", seq=e.seq, event_id=e.event_id, bytes=len(frag),
                          limit=FRAME_BUDGET)
                continue
            out.append((e.seq, frag))
        return out, entries[-1].seq


async def _wait_for_events(wake: asyncio.Event | None) -> None:
    if wake is None:
        await asyncio.sleep(POLL_SECONDS / 5)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(POLL_SECONDS):
            await wake.wait()


def encode_event(entry: OutboxEntry) -> str:
    """One element of an ``events`` message, as JSON text (ASCII, so its length is its size in bytes)."""
    return _element(entry.seq, entry.room_seq, _dumps(entry.event.to_cloudevent()))


def _element(seq: int, room_seq: int, cloudevent: str) -> str:
    return f'{{"seq":{seq},"room_seq":{room_seq},"event":{cloudevent}}}'


def frames(batch: Iterable[tuple[int, str]]) -> Iterable[list[tuple[int, str]]]:
    """Split encoded events into messages below the frame limit."""
    chunk: list[tuple[int, str]] = []
    size = 0
    for item in batch:
        n = len(item[1]) + 1
        if chunk and size + n > FRAME_BUDGET:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk
