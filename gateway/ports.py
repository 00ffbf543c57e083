"""The small interfaces between the sync core and its adapters (design.md §3)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, NamedTuple, Protocol

from prometheus_client import CollectorRegistry

from gateway.errors import GatewayError
from gateway.model import Booking, Command, CommandResult, Event, Person, Room, Window
from gateway.sync.engine import Known


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """What verifying a room against the source found."""

    email: str
    name: str | None = None
    capacity: int | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """One page of incremental changes (SyncFolderItems / delta) for one room."""

    changed_uids: frozenset[str]  # meetings created or updated (masters and singles)
    deleted_item_ids: frozenset[str]  # items gone; the store maps them to meetings
    item_uids: dict[str, str] = field(default_factory=dict)  # item id -> uid for every changed item
    sync_state: str = ""
    more: bool = False
    # Meetings the page already describes completely (single items read with all their fields), so they need
    # no further read; their bookings are here.
    complete_uids: frozenset[str] = frozenset()
    bookings: tuple[Booking, ...] = ()


class CalendarSource(Protocol):
    """A calendar backend (EWS on-premise, Graph online). Every source passes tests/test_source_contract.py."""

    async def verify(self, room: str) -> RoomInfo:
        """Check the mailbox exists and its calendar is readable as the gateway; raise a GatewayError if not."""
        ...

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        """Every booking in the window, recurring series expanded."""
        ...

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        """The bookings of some meetings in the window (a changed series re-expanded)."""
        ...

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        """The next page of changes since ``sync_state`` (None: from the beginning). ``detailed=False`` when only
        the new state matters (an import reads the window anyway)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RoomList:
    """A list of rooms the directory keeps (an Exchange room list is a distribution group of rooms)."""

    email: str
    name: str | None = None


class Directory(Protocol):
    """Rooms and people as the organisation's directory knows them (EWS now; LDAP and Graph later). A directory
    answers for its own organisation only: what it does not know is a NotFound."""

    async def room_lists(self) -> list[RoomList]:
        """Every room list."""
        ...

    async def rooms(self, room_list: str) -> list[RoomInfo]:
        """The rooms of a room list; NotFound (key ``room_list_not_found``) if there is no such list."""
        ...

    async def room(self, email: str) -> RoomInfo:
        """One room's details (name, and capacity where the directory keeps it); NotFound if it has none."""
        ...

    async def people(self, query: str) -> list[Person]:
        """People whose name or address starts with ``query`` (the directory's ambiguous name resolution)."""
        ...


Dirty = Callable[[str, str], Awaitable[None] | None]  # (room, why) -> mark the room for a sync
# Besides a change, a feed tells through ``on_dirty`` "subscribed" (the room's notifications run, again) and
# FEED_POLLING + the reason (its notifications cannot arrive for now: it is polled); rooms' states show both.
FEED_POLLING = "polling: "


class ChangeFeed(Protocol):
    """Notifications that a room changed (streaming / pull). They trigger syncs; they are never the data."""

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        """Run until cancelled, calling ``on_dirty`` for every room that changed or whose feed was interrupted."""
        ...


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int  # global, increasing: the SSE/tunnel resume point
    room_seq: int  # per-room order
    event: Event
    created_at: datetime


class OutboxText(NamedTuple):
    """An outbox event as the relay and the SSE stream send it: its CloudEvent as compact JSON text, made from what
    the store keeps without decoding its data (model.cloudevent_json)."""

    seq: int
    room_seq: int
    type: str
    event_id: str
    cloudevent: str


class Store(Protocol):
    """Durable state: rooms, sync states, the booking snapshot and the outbox (SQLite file by default)."""

    def rooms(self) -> list[Room]: ...

    def room(self, email: str) -> Room | None: ...

    def upsert_room(self, room: Room) -> None: ...

    def remove_room(self, email: str) -> None: ...

    def sync_state(self, room: str) -> str | None: ...

    def known(self, room: str, uids: frozenset[str] | None = None) -> dict[str, Known]:
        """The room's booking snapshot, by booking id (``uids``: only the bookings of these meetings)."""
        ...

    def bookings(self, room: str, start: datetime | None = None, end: datetime | None = None) -> list[Booking]: ...

    def booking(self, room: str, booking_id: str) -> Booking | None:
        """One booking of ``room`` by its id, or None."""

    def uids_for_items(self, room: str, item_ids: frozenset[str]) -> frozenset[str]: ...

    def commit_sync(self, room: str, *, upserts: Sequence[Booking], deletes: Sequence[str], events: Sequence[Event],
                    confirmed: Sequence[str] = (), confirmed_at: datetime | None = None,
                    confirmed_window: Window | None = None,
                    item_uids: dict[str, str] | None = None, removed_items: frozenset[str] = frozenset(),
                    sync_state: str | None = None, clear_sync_state: bool = False,
                    room_row: Room | None = None) -> list[OutboxEntry]:
        """Apply one sync step atomically: snapshot rows, item map, outbox events, and the new sync state (and the
        room's row, when given). ``confirmed_window``: a complete read of that window, which confirms every booking
        of the room overlapping it at ``confirmed_at``."""
        ...

    def commit_syncs(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> list[list[OutboxEntry] | Exception]:
        """Several rooms' steps (``commit_sync``'s room and keyword arguments) in one transaction, each whole or not
        at all: per step its entries, or the error that refused it."""
        ...

    def outbox_after(self, seq: int, limit: int = 500) -> list[OutboxEntry]: ...

    def outbox_texts_after(self, seq: int, limit: int = 500) -> list[OutboxText]:
        """What ``outbox_after`` gives, as the text the relay and the SSE stream send."""
        ...

    def last_seq(self) -> int:
        """The highest outbox seq ever handed out (0 for a new store), pruned events included."""
        ...

    def outbox_stats(self) -> tuple[int, datetime | None]:
        """(depth: events not yet acknowledged, time of the oldest of them)."""
        ...

    def ack(self, seq: int) -> None: ...

    def close(self) -> None: ...


class CommandHandler(Protocol):
    """Executes booking commands (gateway.commands.service); the tunnel and the local API both call it."""

    async def execute(self, cmd: Command) -> CommandResult:
        """Never raises for a bad or failed command: every outcome is a CommandResult."""
        ...


@dataclass(frozen=True, slots=True)
class Written:
    """An item a command wrote into Exchange."""

    mailbox: str  # the organizer (meeting path) or the room (appointment path)
    item_id: str
    uid: str  # the meeting's UID as the gateway's bookings carry it (CleanGlobalObjectId hex)
    change_key: str = ""


@dataclass(frozen=True, slots=True)
class RoomAnswer:
    """What a room's booking attendant answered to a meeting (as seen on the organizer's copy and Inbox)."""

    outcome: str  # pending, accepted, tentative, declined
    reason: str | None = None  # declined: a DECLINE_REASONS code
    message: str = ""  # the attendant's text, when there is one


@dataclass(frozen=True, slots=True)
class Busy:
    start: datetime
    end: datetime
    uid: str | None = None
    status: str = "busy"  # busy, tentative, oof


class CalendarWriter(Protocol):
    """Writes commands into Exchange (sources/ews/writer.py). Every write stamps the idempotency key on the item
    as an extended property, so ``find_by_key`` can tell after a crash whether the write happened."""

    async def create_meeting(self, organizer: str, room: str, cmd: Command) -> Written:
        """A meeting in the organizer's calendar (impersonated), the room as a Resource, invitations sent."""
        ...

    async def create_appointment(self, room: str, cmd: Command) -> Written:
        """An appointment (no attendees) in the room's own calendar. No conflict check here."""
        ...

    async def find_by_key(self, mailbox: str, key: str, start: datetime, end: datetime) -> Written | None: ...

    async def room_answer(self, written: Written, room: str) -> RoomAnswer:
        """The room's answer to a meeting created with create_meeting (pending until the attendant ran)."""
        ...

    async def busy(self, room: str, start: datetime, end: datetime) -> list[Busy]:
        """The room's non-free, non-cancelled items overlapping [start, end), from its calendar (CalendarView)."""
        ...

    async def move(self, written: Written, start: datetime, end: datetime, *, notify: bool) -> Written:
        """New times for an item the gateway wrote (notify: send the update to attendees, i.e. the room)."""
        ...

    async def cancel_meeting(self, written: Written) -> None:
        """Cancel a meeting the gateway created as its organizer (cancellations sent)."""
        ...

    async def delete_appointment(self, written: Written) -> None: ...

    async def decline_as_room(self, room: str, uid: str, original_start: datetime | None, start: datetime,
                              message: str | None) -> None:
        """Decline a meeting (or one occurrence) as the room: the organizer is told, their meeting stays."""
        ...

    async def availability(self, rooms: Sequence[str], start: datetime, end: datetime) -> dict[str, list[Busy]]:
        ...


# -- source kinds (gateway/sources/registry.py finds them by name) --------------------------------------------------
NOTIFICATIONS = ("streaming", "pull", "poll")  # poll: no notifications, the coordinator asks on its timer


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a kind of source can do, declared, so the wiring need not know the kind."""

    notifications: tuple[str, ...]  # the NOTIFICATIONS it offers, best first
    writes: frozenset[str] = frozenset()  # the command types its writer carries out (model.COMMAND_TYPES)
    directory: bool = False  # it lists room lists, rooms and people (a Directory)
    # The change token covers a time window rather than the whole calendar (Graph's calendarView delta; EWS's
    # SyncFolderItems token covers the folder), so a window that rolls forward needs a new token.
    token_window: bool = False


# -- notifications from outside (Graph webhooks, received by the hub and forwarded over the tunnel) -----------------
@dataclass(frozen=True, slots=True)
class Poke:
    """A change notification that reached the gateway from outside: the JSON body Microsoft Graph POSTed to the
    hub, forwarded unchanged over the tunnel. Untrusted: it is only a trigger (a source checks the clientState it
    chose and runs the room's delta); nothing it carries is taken as data."""

    body: dict[str, Any]
    lifecycle: bool  # posted to the lifecycle URL (reauthorizationRequired, subscriptionRemoved, missed)
    received_at: datetime


class NotificationInbox(Protocol):
    """Where pokes arrive (the relay's tunnel, gateway/relay/inbox.py), as a source sees it."""

    def urls(self) -> tuple[str, str] | None:
        """(notificationUrl, lifecycleNotificationUrl) for Graph subscriptions: public HTTPS URLs on the hub that
        forward to this gateway; None until the hub has told them (its first ``welcome``, which comes after the
        sources have started: ask again when ``on_connected(True)`` is called), or when the hub does not relay
        Graph notifications. Once told they stay (the hub keeps them), also while the tunnel is down."""
        ...

    def connected(self) -> bool:
        """Whether pokes can arrive now (the tunnel to the hub is up)."""
        ...

    def listen(self, on_poke: Callable[[Poke], None], on_connected: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``on_poke`` for each poke and ``on_connected`` when the tunnel goes up (True) or down (False), on
        the event loop; returns a function that stops listening."""
        ...


# -- credentials and when they stop working ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CredentialExpiry:
    """When one credential the gateway uses stops working, where that can be known."""

    credential: str  # stable label: "source:onprem", "directory:corp", "relay"
    kind: str  # password, client_secret, certificate, relay_key
    expires_at: datetime | None  # None with known=True: it never expires
    known: bool = True  # False: it cannot be known here (``detail`` says why)
    locked_out: bool = False
    detail: str = ""
    disabled: bool = False  # the account is disabled (it stops working whatever its end date)


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """A directory account as the directory sees it (for AD: msDS-UserPasswordExpiryTimeComputed, lockoutTime,
    badPwdCount, userAccountControl)."""

    name: str  # as asked (DN, UPN or DOMAIN\\user)
    password_expires_at: datetime | None  # None: the password never expires
    locked_out: bool = False
    disabled: bool = False
    bad_password_count: int = 0


class AccountLookup(Protocol):
    """Accounts in the organisation's directory (an LDAP directory implements it); the credential watch asks it
    about each service account a source logs on with."""

    async def account(self, name: str) -> AccountStatus:
        """The account by DN, UPN or DOMAIN\\user; NotFound if the directory has no such account."""
        ...


class CredentialProbe(Protocol):
    """Something that knows when its own credentials end (a Graph source: its certificate or secret)."""

    async def credential_expiry(self) -> list[CredentialExpiry]: ...


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One configured source as the wiring hands it to its kind: its name, the kind's own settings (for ews an
    EwsSettings), the resolved secret and the rooms it owns (explicit, and room lists to expand at start-up)."""

    name: str
    kind: str
    settings: object
    secret: str | None = field(default=None, repr=False)
    rooms: tuple[str, ...] = ()
    room_lists: tuple[str, ...] = ()
    # The secret read afresh (from the vault): while the source's credentials are refused the wiring reads it again
    # now and then and hands a changed one to the source (``OpenedSource.set_secret``).
    reread_secret: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    # Pokes from outside (Graph webhooks through the hub); None when no relay is configured.
    inbox: NotificationInbox | None = field(default=None, repr=False, compare=False)


class Outage(Protocol):
    """A source's view of a failure every one of its rooms shares (sources/outage.py's OutageGate): the failure
    going on (None: none), and listeners told when one starts (the error) and ends (None), from any thread."""

    failure: GatewayError | None
    listeners: list[Callable[[GatewayError | None], None]]


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """How the gateway wants to hear of changes (the configuration's sync section)."""

    mode: str = "streaming"  # one of NOTIFICATIONS
    stream_timeout_minutes: int = 10
    group_size: int = 200
    pull_interval_seconds: float = 10.0
    retry_seconds: float = 5.0  # first back-off before a room that could not be subscribed is tried again


@dataclass
class OpenedSource:
    """A source its kind has built: the parts the gateway runs. ``feed`` None: the coordinator polls."""

    name: str
    kind: str
    capabilities: Capabilities
    calendar: CalendarSource
    close: Callable[[], Awaitable[None]]
    directory: Directory | None = None
    writer: CalendarWriter | None = None
    feed: ChangeFeed | None = None
    stop_feed: Callable[[], None] = lambda: None  # end the feed's connections now (before its task is cancelled)
    # A fresh feed in place of one that failed (the wiring restarts a failed feed); None: ``feed`` is watched again.
    new_feed: Callable[[], ChangeFeed | None] | None = None
    outage: Outage | None = None  # the source's shared failures, when it tells them apart
    set_secret: Callable[[str], None] | None = None  # new credentials (re-read while the old ones are refused)
    credentials: CredentialProbe | None = None  # when its credentials end, where the source itself can know


class SourceKind(Protocol):
    """A kind of calendar source (ews, memory; graph next), found by name in gateway/sources/registry.py. An
    application makes one instance of each kind it uses, with its metrics registry (where the kind may keep metrics
    of its own); ``open`` builds one configured source, ``settings`` reads the kind's settings from a configuration
    section."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, metrics: CollectorRegistry) -> None: ...

    @staticmethod
    def settings(section: Any, place: str) -> object:
        """The kind's settings from its configuration section (``place``: where it is written, for messages)."""
        ...

    def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource: ...
