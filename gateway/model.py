"""The normalized booking and the events the gateway relays: pure data, standard library only.

A booking is one room's reservation of one meeting instance. Its id is derived from what Exchange keeps stable
across mailbox copies and item moves — the meeting's iCalendar UID (CleanGlobalObjectId) and, for an instance
of a series, the occurrence's original start — plus the room, so two rooms in one meeting are two bookings
that share a ``meeting_id``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from json.encoder import encode_basestring_ascii as _str  # what json.dumps writes for a str (ensure_ascii)
from typing import Any

from gateway.frozen import copier, fast_init

SCHEMA_VERSION = "1.0"


class EventType(StrEnum):
    """The CloudEvents ``type`` of what the gateway relays (docs/relay-protocol.md, section 14)."""

    BOOKING_CREATED = "com.exchangegateway.booking.created.v1"
    BOOKING_UPDATED = "com.exchangegateway.booking.updated.v1"
    BOOKING_DELETED = "com.exchangegateway.booking.deleted.v1"
    ROOM_STATE_CHANGED = "com.exchangegateway.room.state_changed.v1"
    # A room's complete window follows, between "begin" and "end" (a room imported by a new owner): a consumer
    # drops the room's bookings in the window that were not announced between the two (docs/relay-protocol.md §7).
    ROOM_SNAPSHOT = "com.exchangegateway.room.snapshot.v1"
    # the directory's people (schemas/person.v1.json), partitioned by directory ("directory:NAME") as bookings are
    # by room
    PERSON_CREATED = "com.exchangegateway.person.created.v1"
    PERSON_UPDATED = "com.exchangegateway.person.updated.v1"
    PERSON_DISABLED = "com.exchangegateway.person.disabled.v1"
    PERSON_REMOVED = "com.exchangegateway.person.removed.v1"


EVENT_TYPES = {  # by the short names the code has always used
    "created": EventType.BOOKING_CREATED,
    "updated": EventType.BOOKING_UPDATED,
    "deleted": EventType.BOOKING_DELETED,
    "room_state": EventType.ROOM_STATE_CHANGED,
    "room_snapshot": EventType.ROOM_SNAPSHOT,
}


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def utc_text(value: datetime) -> str:
    """2026-03-29T01:30:59Z: what strftime("%Y-%m-%dT%H:%M:%SZ") gives in UTC, at a tenth of its cost (an import
    formats several times a booking, and booking ids are hashed over this text)."""
    if value.tzinfo is UTC:  # (as Exchange's times are read)
        return _text_of_utc(value)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


@functools.lru_cache(maxsize=16384)  # (a year of half hours: meetings start and end on few distinct times)
def _text_of_utc(value: datetime) -> str:
    # Only UTC times are kept: two times of another zone can be equal keys and other instants (a wall time of the
    # hour a clock goes back, fold 0 and 1). A UTC time's first 19 characters are these, to the second.
    return value.isoformat()[:19] + "Z"


@functools.lru_cache(maxsize=4096)  # every instance of a series hashes the same UID
def meeting_id_for(uid: str) -> str:
    return _short_hash("meeting", uid)


def booking_id_for(room: str, uid: str, original_start: datetime | None) -> str:
    anchor = utc_text(original_start) if original_start else ""
    return _short_hash("booking", room.lower(), uid, anchor)


@dataclass(frozen=True, slots=True)
class Person:
    email: str | None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Attendee:
    email: str
    name: str | None
    kind: str  # required, optional, resource
    response: str  # accepted, tentative, declined, none, organizer, unknown


@fast_init
@dataclass(frozen=True, slots=True)
class Booking:
    room: str
    uid: str  # the meeting's iCalendar UID (for Exchange: the CleanGlobalObjectId in hex)
    start: datetime  # UTC
    end: datetime  # UTC
    timezone: str = "UTC"  # IANA zone the meeting was created in
    original_start: datetime | None = None  # set for instances of a series
    all_day: bool = False
    start_date: date | None = None  # all-day bookings: first day
    end_date: date | None = None  # all-day bookings: day after the last (exclusive)
    subject: str | None = None
    subject_is_organizer_name: bool = False  # Exchange replaced the subject with the organizer's name
    organizer: Person | None = None
    attendees: tuple[Attendee, ...] = ()
    sensitivity: str = "normal"  # normal, personal, private, confidential
    online_meeting_url: str | None = None
    response: str = "accepted"  # the room's answer: accepted, tentative, declined, none, organizer
    cancelled: bool = False
    series_id: str | None = None
    is_exception: bool = False
    origin: str = "exchange"  # exchange, or gateway for bookings the gateway itself made
    free_busy: str = "busy"
    confirmed_at: datetime | None = None  # when the gateway last saw it in Exchange (not part of the content)
    # Derived once (hashing is the hot path of a large import); not constructor arguments.
    id: str = field(init=False, compare=False, repr=False)
    meeting_id: str = field(init=False, compare=False, repr=False)
    _hash: str | None = field(init=False, compare=False, repr=False, default=None)
    _content: dict[str, Any] | None = field(init=False, compare=False, repr=False, default=None)
    _json: str | None = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", booking_id_for(self.room, self.uid, self.original_start))
        object.__setattr__(self, "meeting_id", meeting_id_for(self.uid))

    def content(self) -> dict[str, Any]:
        """Everything a consumer sees, minus freshness. Built when first asked for and shared: read it, never change
        it (threads that ask at once may each build an equal one; one is kept)."""
        if self._content is None:
            object.__setattr__(self, "_content", _content(self))
        return self._content  # type: ignore[return-value]

    def content_json(self) -> str:
        """The content as JSON text, keys sorted: what the content hash is taken of (and what the store keeps)."""
        if self._json is None:
            object.__setattr__(self, "_json", _content_json(self))
        return self._json  # type: ignore[return-value]

    def content_hash(self) -> str:
        if self._hash is None:
            digest = hashlib.sha256(self.content_json().encode()).hexdigest()[:32]
            object.__setattr__(self, "_hash", digest)
        return self._hash  # type: ignore[return-value]

    def confirmed(self, at: datetime) -> Booking:
        """The same booking seen again at ``at``: freshness is not content, so the copy keeps content, hash and ids
        (a copy field by field: dataclasses.replace would run __init__ and hash the ids again). What is confirmed
        is published: its hash (and content JSON) is made here, once, and the copy shares it. Its content as a dict
        is made when somebody asks for it (an event's data is read by few; the store and relay need the JSON).

        A booking never confirmed is one a source has just read, held by no one but the sync that plans it: it is
        stamped itself, once, instead of copied (the copy was a twentieth of an import's CPU). A booking already
        confirmed (published, stored, perhaps held elsewhere) is never changed but for what it caches."""
        self.content_hash()
        if self.confirmed_at is None:
            object.__setattr__(self, "confirmed_at", at)
            return self
        return _booking_with_confirmed_at(self, at)


_booking_with_confirmed_at = copier(Booking, "confirmed_at")


class _ByIdentity:
    """Values derived from objects many bookings share, kept by the object's identity: hashing a tuple of
    attendees by value costs more than deriving from it. Every instance of a series holds its meeting's one tuple
    of attendees (a source reads a meeting's people once), so their JSON and dicts are made once a meeting instead
    of once an instance. An entry holds its object, so no other object can have that id while the entry lives; at
    ``size`` entries all are dropped. Threads may derive the same value twice; each gets a whole one."""

    def __init__(self, derive: Callable[[Any], Any], size: int = 4096) -> None:
        self._derive = derive
        self._size = size
        self._entries: dict[int, tuple[Any, Any]] = {}

    def __call__(self, obj: Any) -> Any:
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj:
            return entry[1]
        value = self._derive(obj)
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)
        return value


def _dicts_of(attendees: tuple[Attendee, ...]) -> list[dict[str, Any]]:
    return [{"email": a.email, "name": a.name, "kind": a.kind, "response": a.response} for a in attendees]


def _json_of(attendees: tuple[Attendee, ...]) -> str:
    """The attendees' JSON objects, keys sorted, as json.dumps writes them (the list's brackets left out)."""
    s = _str
    return ", ".join([f'{{"email": {s(a.email)}, "kind": {s(a.kind)}, '
                      f'"name": {"null" if a.name is None else s(a.name)}, "response": {s(a.response)}}}'
                      for a in attendees])


_attendee_dicts = _ByIdentity(_dicts_of)  # (content is shared, never changed: so may its attendees be)
_attendees_json = _ByIdentity(_json_of)


def _iso(value: datetime | date | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return utc_text(value)
    return value.isoformat()


def to_json(b: Booking) -> dict[str, Any]:
    """The published JSON form (schemas/booking.v1.json): the content, then freshness."""
    d = dict(b.content())
    d["confirmed_at"] = confirmed_text(b)
    return d


def confirmed_text(b: Booking) -> str | None:
    """The booking's confirmed_at as the published form writes it."""
    global _last_confirmed
    at = b.confirmed_at
    if at is None:
        return None
    last = _last_confirmed  # a sync step's bookings share their confirmed_at: formatted once
    if last[0] is not at:
        last = _last_confirmed = (at, utc_text(at))  # (swapped whole: a thread sees an old or a new pair)
    return last[1]


_last_confirmed: tuple[datetime | None, str] = (None, "")


class BookingData(Mapping[str, Any]):
    """A booking event's data, ``to_json`` of its booking (and the reason of a deletion), made when first read.

    An event carries its data as the JSON text the outbox stores and the relay sends (made from the content's text,
    which the content hash needs anyway); the data as a dict is for whoever in the process reads an event's fields.
    Made for every booking of an import, those dicts and the content dicts behind them were a tenth of the sync's own
    CPU, and nobody read them. Read-only, like any event's data; threads that read it first at once each make an
    equal dict and one is kept."""

    __slots__ = ("_booking", "_confirmed", "_data", "_reason")

    def __init__(self, booking: Booking, reason: str | None = None) -> None:
        self._booking = booking
        self._confirmed = confirmed_text(booking)  # (as the event's text says it, whatever becomes of the booking)
        self._reason = reason
        self._data: dict[str, Any] | None = None

    @property
    def confirmed_at(self) -> str | None:
        return self._confirmed

    def _made(self) -> dict[str, Any]:
        d = self._data
        if d is None:
            d = dict(self._booking.content())
            d["confirmed_at"] = self._confirmed
            if self._reason:
                d["reason"] = self._reason
            self._data = d
        return d

    def __getitem__(self, key: str) -> Any:
        return self._made()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._made().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._made()

    def __iter__(self) -> Iterator[str]:
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._made())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BookingData):
            other = other._made()
        return self._made() == other

    __hash__ = None  # type: ignore[assignment]  # (as a dict's)

    def __repr__(self) -> str:
        return repr(self._made())


def _content(b: Booking) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "id": b.id,
        "meeting_id": b.meeting_id,
        "room": b.room,
        "uid": b.uid,
        "series_id": b.series_id,
        "original_start": None if b.original_start is None else utc_text(b.original_start),
        "is_exception": b.is_exception,
        "start": utc_text(b.start),
        "end": utc_text(b.end),
        "timezone": b.timezone,
        "all_day": b.all_day,
        "start_date": _iso(b.start_date),
        "end_date": _iso(b.end_date),
        "subject": b.subject,
        "subject_is_organizer_name": b.subject_is_organizer_name,
        "organizer": {"email": b.organizer.email, "name": b.organizer.name} if b.organizer else None,
        "attendees": _attendee_dicts(b.attendees),
        "sensitivity": b.sensitivity,
        "online_meeting_url": b.online_meeting_url,
        "response": b.response,
        "free_busy": b.free_busy,
        "cancelled": b.cancelled,
        "origin": b.origin,
    }


def _flag(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    raise TypeError(value)


def _content_json(b: Booking) -> str:
    """``json.dumps(b.content(), sort_keys=True)``, character for character (content hashes are taken of it, and
    the store keeps hashes across versions), straight from the booking's fields in a third of its time and without
    the dict (a reconciliation only compares hashes). A field of another type than the booking declares falls back
    to json.dumps."""
    s = _str
    try:
        o = b.organizer
        organizer = "null" if o is None else (f'{{"email": {"null" if o.email is None else s(o.email)}, '
                                              f'"name": {"null" if o.name is None else s(o.name)}}}')
        people = _attendees_json(b.attendees)
        url, series, subject = b.online_meeting_url, b.series_id, b.subject
        start_date, end_date = _iso(b.start_date), _iso(b.end_date)
        c = b._content  # (a confirmed booking's content is made first: its times are formatted there already)
        if c is None:
            start, end = utc_text(b.start), utc_text(b.end)
            original = None if b.original_start is None else utc_text(b.original_start)
        else:
            start, end, original = c["start"], c["end"], c["original_start"]
        return (
            f'{{"all_day": {_flag(b.all_day)}, "attendees": [{people}], "cancelled": {_flag(b.cancelled)}, '
            f'"end": {s(end)}, "end_date": {"null" if end_date is None else s(end_date)}, '
            f'"free_busy": {s(b.free_busy)}, "id": {s(b.id)}, "is_exception": {_flag(b.is_exception)}, '
            f'"meeting_id": {s(b.meeting_id)}, "online_meeting_url": {"null" if url is None else s(url)}, '
            f'"organizer": {organizer}, "origin": {s(b.origin)}, '
            f'"original_start": {"null" if original is None else s(original)}, '
            f'"response": {s(b.response)}, "room": {s(b.room)}, "schema_version": {s(SCHEMA_VERSION)}, '
            f'"sensitivity": {s(b.sensitivity)}, "series_id": {"null" if series is None else s(series)}, '
            f'"start": {s(start)}, "start_date": {"null" if start_date is None else s(start_date)}, '
            f'"subject": {"null" if subject is None else s(subject)}, '
            f'"subject_is_organizer_name": {_flag(b.subject_is_organizer_name)}, '
            f'"timezone": {s(b.timezone)}, "uid": {s(b.uid)}}}')
    except (TypeError, AttributeError):
        return json.dumps(b.content(), sort_keys=True)


def _dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _date(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def from_json(d: dict[str, Any]) -> Booking:
    start, end = _dt(d["start"]), _dt(d["end"])
    assert start is not None and end is not None
    org = d.get("organizer")
    return Booking(
        room=d["room"], uid=d["uid"], start=start, end=end, timezone=d.get("timezone") or "UTC",
        original_start=_dt(d.get("original_start")), all_day=bool(d.get("all_day")),
        start_date=_date(d.get("start_date")), end_date=_date(d.get("end_date")), subject=d.get("subject"),
        subject_is_organizer_name=bool(d.get("subject_is_organizer_name")),
        organizer=Person(org.get("email"), org.get("name")) if org else None,
        attendees=tuple(Attendee(a["email"], a.get("name"), a["kind"], a["response"])
                        for a in d.get("attendees") or ()),
        sensitivity=d.get("sensitivity") or "normal", online_meeting_url=d.get("online_meeting_url"),
        response=d.get("response") or "accepted", cancelled=bool(d.get("cancelled")),
        series_id=d.get("series_id"), is_exception=bool(d.get("is_exception")), origin=d.get("origin") or "exchange",
        free_busy=d.get("free_busy") or "busy", confirmed_at=_dt(d.get("confirmed_at")),
    )


class RoomState(StrEnum):
    """Where a room stands; ``remedy`` says it for a person (and what to do)."""

    PENDING = "pending"
    VERIFIED = "verified"
    SYNCING = "syncing"
    POLLING = "polling"
    MAILBOX_NOT_FOUND = "mailbox_not_found"
    IMPERSONATION_DENIED = "impersonation_denied"
    AUTH_REQUIRED = "auth_required"
    ACCOUNT_LOCKED = "account_locked"
    THROTTLED = "throttled"
    CANNOT_CONNECT = "cannot_connect"
    UNKNOWN_HOST = "unknown_host"
    TLS_ERROR = "tls_error"
    HTTP_ERROR = "http_error"
    EXCHANGE_ERROR = "exchange_error"
    SUSPECT_EMPTY = "suspect_empty"
    DISCONNECTED = "disconnected"

    @property
    def remedy(self) -> str:
        return _REMEDIES[self]


_REMEDIES: dict[RoomState, str] = {
    RoomState.PENDING: "waiting to be verified",
    RoomState.VERIFIED: "connected and in sync",
    RoomState.SYNCING: "importing its calendar",
    RoomState.POLLING: "in sync by polling: the change feed is down and restarts with back-off, so changes arrive "
                       "within the poll interval; see the logs for why the feed stopped",
    RoomState.MAILBOX_NOT_FOUND: "Exchange has no mailbox at this address; check the address in the configuration",
    RoomState.IMPERSONATION_DENIED: "the service account may not impersonate this room; extend the "
                                    "ApplicationImpersonation scope to it",
    RoomState.AUTH_REQUIRED: "Exchange refused the service account's credentials; run "
                             "`gateway credentials set exchange`",
    RoomState.ACCOUNT_LOCKED: "Active Directory has locked the service account out; unlock it and check its password",
    RoomState.THROTTLED: "Exchange is throttling the service account; syncs resume after its back-off",
    RoomState.CANNOT_CONNECT: "Exchange cannot be reached; check that it is up, the host and port in "
                              "exchange.ews_url, and the firewall",
    RoomState.UNKNOWN_HOST: "the host name in exchange.ews_url does not resolve; check it and the gateway's DNS",
    RoomState.TLS_ERROR: "the TLS connection to Exchange failed; check its certificate or exchange.ca_bundle",
    RoomState.HTTP_ERROR: "Exchange answered with an HTTP error; 404 means the path in exchange.ews_url is wrong "
                          "(/EWS/Exchange.asmx), 5xx that EWS itself is failing on the server",
    RoomState.EXCHANGE_ERROR: "Exchange answered with an error for this room; retried automatically",
    RoomState.SUSPECT_EMPTY: "the room suddenly lists no bookings although many were known; nothing was deleted; "
                             "the next syncs confirm or clear it",
    RoomState.DISCONNECTED: "removed from the gateway (`gateway rooms forget`); its bookings were withdrawn",
}
ROOM_STATES: dict[str, str] = {state: state.remedy for state in RoomState}  # state -> remedy, by its text


@dataclass(frozen=True, slots=True)
class Room:
    email: str
    name: str | None = None
    capacity: int | None = None
    timezone: str = "UTC"
    state: RoomState = RoomState.PENDING
    reason: str = ""
    remedy: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RoomState(self.state))  # the store and old callers give its text


@fast_init
@dataclass(frozen=True, slots=True)
class Event:
    """A CloudEvents 1.0 event as stored in the outbox and relayed."""

    id: str
    type: EventType
    room: str
    subject: str  # the booking id, or the room for room events
    time: datetime
    data: Mapping[str, Any]  # a dict, or a booking event's BookingData
    sequence: int = 0  # per-room order, assigned by the store
    source: str = "urn:exchange-gateway"
    # ``data`` as JSON text, when whoever built the event had it at hand (a booking's content is encoded once for
    # its hash; sync/events.py reuses that text): what the outbox stores. None: the store encodes ``data``.
    data_json: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.type) is not EventType:  # the store and old callers give its text
            object.__setattr__(self, "type", EventType(self.type))

    def sequenced(self, sequence: int) -> Event:
        """This event with its per-room sequence (a copy field by field: replace() would run __init__ again)."""
        return _event_with_sequence(self, sequence)

    def to_cloudevent(self) -> dict[str, Any]:
        doc = _cloudevent_head(self.id, self.type, self.room, self.subject, utc_text(self.time), self.sequence,
                               self.source)
        data = self.data
        doc["data"] = data if type(data) is dict else dict(data)  # (BookingData: JSON encoders take dicts)
        return doc


def _cloudevent_head(event_id: str, type_: str, room: str, subject: str, time_text: str, sequence: int,
                     source: str) -> dict[str, Any]:
    """An event's CloudEvent without its data (which comes last)."""
    doc = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"{source}/rooms/{room}",
        "type": type_,
        "subject": subject,
        "time": time_text,
        "datacontenttype": "application/json",
        "dataschema": ("https://exchange-gateway.dev/schemas/booking.v1.json" if "booking" in type_ else
                       "https://exchange-gateway.dev/schemas/person.v1.json" if ".person." in type_ else None),
        "sequence": str(sequence),
        "partitionkey": room,
    }
    if doc["dataschema"] is None:  # CloudEvents: absent, or a URI
        del doc["dataschema"]
    return doc


_compact = json.JSONEncoder(separators=(",", ":")).encode


def cloudevent_json(event_id: str, type_: str, room: str, subject: str, stored_time: str, sequence: int,
                    source: str, data_json: str) -> str:
    """``Event.to_cloudevent()`` as compact JSON text, from an outbox row as the store keeps it: ``stored_time`` the
    fixed-width UTC text of the event's time, ``data_json`` its data's JSON text, put in as it is. The relay and the
    SSE stream send stored events this way: decoding each event's data to encode it again was a fifth of the
    gateway's CPU while a tunnel carried an import. ``json.loads`` of it equals ``to_cloudevent()`` of the event
    (tests/test_outbox_text.py)."""
    time_text = stored_time[:19] + "Z" if len(stored_time) == 27 and stored_time.endswith("Z") \
        else utc_text(datetime.fromisoformat(stored_time))  # (to the second, as to_cloudevent gives it)
    head = _compact(_cloudevent_head(event_id, type_, room, subject, time_text, sequence, source))
    return f'{head[:-1]},"data":{data_json}}}'


_event_with_sequence = copier(Event, "sequence")


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime

    def contains(self, b: Booking) -> bool:
        return b.start < self.end and b.end > self.start


@dataclass
class SyncCounts:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    held_back: int = 0
    notes: list[str] = field(default_factory=list)


# -- commands from the cloud (docs/relay-protocol.md) -----------------------------------------------------------
class CommandType(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    CANCEL = "cancel"
    DECLINE = "decline"
    RESYNC = "resync"
    AVAILABILITY = "availability"


class ResultStatus(StrEnum):
    ACCEPTED = "accepted"
    DECLINED = "declined"
    FAILED = "failed"


class DeclineReason(StrEnum):
    """Why a command was declined (docs/relay-protocol.md, section 7); a retry will not change it."""

    CONFLICT = "conflict"
    OUTSIDE_BOOKING_WINDOW = "outside_booking_window"
    TOO_LONG = "too_long"
    RECURRING_NOT_ALLOWED = "recurring_not_allowed"
    NOT_PERMITTED = "not_permitted"
    ROOM_UNKNOWN = "room_unknown"
    OUTSIDE_SYNC_WINDOW = "outside_sync_window"
    ORGANIZER_NOT_PERMITTED = "organizer_not_permitted"  # the directory says this organizer may not book


COMMAND_TYPES = tuple(CommandType)
DECLINE_REASONS = tuple(DeclineReason)
RESULT_STATUSES = tuple(ResultStatus)


@dataclass(frozen=True, slots=True)
class Command:
    """A booking command, validated (gateway.relay.protocol.parse_command builds it from JSON).

    ``key`` is the idempotency key: the same key always yields the same outcome and never a second booking.
    """

    key: str
    type: CommandType
    room: str | None = None  # create, update, cancel, decline, resync
    rooms: tuple[str, ...] = ()  # availability
    start: datetime | None = None  # UTC; create, update, availability
    end: datetime | None = None
    subject: str | None = None
    organizer: Person | None = None  # a directory user: the meeting goes in their calendar
    booker: Person | None = None  # an external or anonymous booker: an appointment in the room calendar
    attendees: tuple[Person, ...] = ()
    booking_id: str | None = None  # update, cancel, decline: the booking (as relayed in events)
    message: str | None = None  # decline: the text the organizer receives
    received_at: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", CommandType(self.type))

    def request_hash(self) -> str:
        """What the command asks for, without its key: a retried key must carry the same request."""
        doc = {"type": self.type, "room": self.room and self.room.lower(),
               "rooms": sorted(r.lower() for r in self.rooms), "start": _iso(self.start), "end": _iso(self.end),
               "subject": self.subject,
               "organizer": self.organizer and [self.organizer.email, self.organizer.name],
               "booker": self.booker and [self.booker.email, self.booker.name],
               "attendees": [[a.email, a.name] for a in self.attendees], "booking_id": self.booking_id,
               "message": self.message}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The explicit outcome of a command: accepted, declined (with a reason code) or failed (retryable or not)."""

    key: str
    status: ResultStatus
    reason: str | None = None  # declined: a DeclineReason; failed: an error code (protocol.ERROR_CODES)
    retryable: bool = False  # failed only: the same command (same key) may succeed later
    message: str = ""  # for a person: what happened and what to do
    booking_id: str | None = None  # accepted create/update: the booking as it will appear in events
    uid: str | None = None  # the meeting's UID
    data: dict[str, Any] | None = None  # availability: {"rooms": {room: [{"start","end","status"}]}}

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ResultStatus(self.status))
        if self.status is ResultStatus.DECLINED:
            object.__setattr__(self, "reason", DeclineReason(self.reason or ""))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "status": self.status}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.status == "failed":
            out["retryable"] = self.retryable
        if self.message:
            out["message"] = self.message
        if self.booking_id:
            out["booking_id"] = self.booking_id
        if self.uid:
            out["uid"] = self.uid
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommandResult:
        return cls(key=d["key"], status=d["status"], reason=d.get("reason"), retryable=bool(d.get("retryable")),
                   message=d.get("message", ""), booking_id=d.get("booking_id"), uid=d.get("uid"),
                   data=d.get("data"))


def accepted(cmd: Command, message: str = "", **kw: Any) -> CommandResult:
    return CommandResult(cmd.key, ResultStatus.ACCEPTED, message=message, **kw)


def declined(cmd: Command, reason: DeclineReason | str, message: str) -> CommandResult:
    return CommandResult(cmd.key, ResultStatus.DECLINED, reason=DeclineReason(reason), message=message)


def failed(cmd_key: str, code: str, message: str, *, retryable: bool) -> CommandResult:
    return CommandResult(cmd_key, ResultStatus.FAILED, reason=code, retryable=retryable, message=message)
