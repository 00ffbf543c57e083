"""The simulator's fast path for the hot reads (issue 13): calendar items written as text must be byte for byte
what the element tree writes, for every seeded item and instance and every shape a client asks for; and what a
client reads after a change must be the changed item, through each of the three reads that take the fast path."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
from collections.abc import Iterator

import pytest
import requests
from lxml import etree

from gateway.simulator import ids, itemxml
from gateway.simulator.calendar import Attendee, CalendarItem, Person
from gateway.simulator.itemxml import Shape, View, _plan, render, render_all, render_fast
from gateway.simulator.mailboxes import Directory
from gateway.simulator.ops import OPERATIONS, Context
from gateway.simulator.schema import MNS, TNS, validate
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD, seed_bookings, standard_org
from gateway.simulator.server import Simulator, SimulatorConfig
from gateway.simulator.soap import (
    FRAGMENT_PI,
    RESP_NSMAP,
    collect_fragments,
    envelope,
    has_fragments,
    materialize,
    splice,
)

NOW = dt.datetime(2026, 12, 7, 9, 0, tzinfo=dt.UTC)
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ROOM = "room1@contoso.com"

# The ExtendedFieldURIs our gateway asks for (CleanGlobalObjectId, GlobalObjectId, its command key), and one by tag.
EXT = ('<t:ExtendedFieldURI DistinguishedPropertySetId="Meeting" PropertyId="35" PropertyType="Binary"/>'
       '<t:ExtendedFieldURI DistinguishedPropertySetId="Meeting" PropertyId="3" PropertyType="Binary"/>'
       '<t:ExtendedFieldURI DistinguishedPropertySetId="PublicStrings" PropertyName="ExchangeGatewayCommandKey" '
       'PropertyType="String"/>'
       '<t:ExtendedFieldURI PropertyTag="0x0037" PropertyType="String"/>')
VIEW = ("calendar:Start", "calendar:End", "item:Subject", "calendar:IsAllDayEvent", "calendar:LegacyFreeBusyStatus",
        "item:Sensitivity", "calendar:CalendarItemType", "calendar:IsCancelled", "calendar:MyResponseType",
        "calendar:IsMeeting", "calendar:Location", "calendar:StartTimeZone", "calendar:OriginalStart")
DETAIL = ("calendar:Organizer", "calendar:RequiredAttendees", "calendar:OptionalAttendees", "calendar:Resources")
EVERY_FAST = (
    "item:ItemId", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Sensitivity", "item:Categories",
    "item:Size", "item:DateTimeReceived", "item:Importance", "item:IsSubmitted", "item:IsDraft", "item:IsFromMe",
    "item:IsResend", "item:IsUnmodified", "item:DateTimeSent", "item:DateTimeCreated", "item:ReminderIsSet",
    "item:ReminderMinutesBeforeStart", "item:DisplayCc", "item:DisplayTo", "item:HasAttachments", "item:Culture",
    "item:LastModifiedName", "item:LastModifiedTime", "item:IsAssociated", "calendar:UID", "calendar:RecurrenceId",
    "calendar:DateTimeStamp", "calendar:IsRecurring", "calendar:MeetingRequestWasSent",
    "calendar:IsResponseRequested", "calendar:Duration", "calendar:TimeZone", "calendar:AppointmentReplyTime",
    "calendar:AppointmentSequenceNumber", "calendar:AppointmentState", "calendar:EndTimeZone",
    "calendar:ConferenceType", "calendar:AllowNewTimeProposal", "calendar:IsOnlineMeeting", "calendar:NetShowUrl",
    "calendar:ConflictingMeetingCount", "calendar:AdjacentMeetingCount", *VIEW, *DETAIL,
)
# (name, ItemShape, whether the fast path must take it)
SHAPES = [
    ("IdOnly", "<m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>", True),
    ("Default", "<m:ItemShape><t:BaseShape>Default</t:BaseShape></m:ItemShape>", True),
    ("AllProperties", "<m:ItemShape><t:BaseShape>AllProperties</t:BaseShape></m:ItemShape>", False),
    ("view", None, True),
    ("view+detail", None, True),
    ("sync", None, True),
    ("every fast field", None, True),
    ("with body", None, False),
]


def shape_xml(uris: tuple[str, ...], ext: str = EXT) -> str:
    fields = "".join(f'<t:FieldURI FieldURI="{u}"/>' for u in uris)
    return (f"<m:ItemShape><t:BaseShape>IdOnly</t:BaseShape><t:AdditionalProperties>{fields}{ext}"
            "</t:AdditionalProperties></m:ItemShape>")


SHAPE_XML = {
    "view": shape_xml(VIEW),
    "view+detail": shape_xml(VIEW + DETAIL),
    "sync": shape_xml(("calendar:CalendarItemType",)),
    "every fast field": shape_xml(EVERY_FAST),
    "with body": shape_xml(("item:Subject", "item:Body")),
}


def parse_shape(xml: str) -> Shape:
    root = etree.fromstring(f'<x xmlns:m="{MNS}" xmlns:t="{TNS}">{xml}</x>')
    return Shape.parse(root[0])


@pytest.fixture(scope="module")
def directory() -> Directory:
    d = Directory()
    standard_org(d, rooms=3, users=4)
    seed_bookings(d, seed=7, now=NOW, future_days=60)
    # Text that needs escaping, outside ASCII, and empty: each must be written exactly as lxml writes it.
    items = [i for i in d.items.values() if i.mailbox.smtp == ROOM]
    odd = items[0]
    odd.subject = 'Q&A <board> "review" \r\n\ttabs \u00e9t\u00e9 \U0001F600'
    odd.location = "R&D > lab\r"
    odd.categories = ("Red & <Blue>", "")
    odd.organizer = Person("o'neil@contoso.com", 'O\'Neil & "Sons" \u00e7a')
    odd.required = (Attendee(Person("x@contoso.com", "X <y>\r\n"), "Accept", NOW),)
    odd.online_url = "https://meet/?a=1&b=<2>"
    odd.ext = {("PublicStrings", "ExchangeGatewayCommandKey", "String"): 'k&"<>\r\n\t'}
    items[1].location = ""
    items[1].subject = ""
    return d


def views(d: Directory) -> Iterator[View]:
    for item in list(d.items.values()):
        if not isinstance(item, CalendarItem):
            continue
        yield View(item, None, d)
        for inst in item.instances(NOW - dt.timedelta(days=40), NOW + dt.timedelta(days=70)):
            yield View(item, inst, d)


@pytest.mark.parametrize(("name", "xml", "fast"), SHAPES, ids=[s[0] for s in SHAPES])
def test_fast_path_writes_what_the_element_tree_writes(directory: Directory, name: str, xml: str | None,
                                                       fast: bool) -> None:
    shape = parse_shape(xml or SHAPE_XML[name])
    assert (_plan(shape) is not None) is fast, f"the fast path {'skips' if fast else 'takes'} the shape {name}"
    compared = 0
    for view in views(directory):
        tree = etree.Element(f"{{{MNS}}}Items", nsmap=RESP_NSMAP)
        text = etree.Element(f"{{{MNS}}}Items", nsmap=RESP_NSMAP)
        render(tree, view, shape)
        render_fast(text, view, shape)
        assert has_fragments(text) is fast
        expected = etree.tostring(tree)
        assert splice(etree.tostring(text)) == expected, f"{name}: {view.item.subject!r}"
        # parsed back (for the schema check, fault injection): the same document, if not the same bytes
        # (an empty text is written <t:X></t:X>, and reads back as <t:X/>)
        assert etree.tostring(materialize(text), method="c14n") == etree.tostring(tree, method="c14n")
        compared += 1
    assert compared > 500  # every seeded item and instance of the window
    # A CalendarView's answer: all of them at once (one fragment where they are written as text), as the server
    # writes it (the fragment's text kept aside while the request is served).
    tree = etree.Element(f"{{{MNS}}}Items", nsmap=RESP_NSMAP)
    for view in views(directory):
        render(tree, view, shape)

    def served() -> bytes:
        collect_fragments()
        text = etree.Element(f"{{{MNS}}}Items", nsmap=RESP_NSMAP)
        render_all(text, views(directory), shape)
        assert len(etree.tostring(text)) < 2000 or not fast  # the instruction holds a number, not the text
        return splice(etree.tostring(text))
    assert contextvars.copy_context().run(served) == etree.tostring(tree)


def test_fragments_are_spliced_into_the_envelope(directory: Directory) -> None:
    item = next(i for i in directory.items.values() if i.mailbox.smtp == ROOM)
    root = etree.Element(f"{{{MNS}}}GetItemResponse", nsmap=RESP_NSMAP)
    render_fast(root, View(item, None, directory), parse_shape(SHAPE_XML["view+detail"]))
    body = envelope([root])
    assert FRAGMENT_PI.encode() not in body
    answer = etree.fromstring(body).find(f"{{{SOAP}}}Body")[0]
    assert answer.find(f"{{{TNS}}}CalendarItem/{{{TNS}}}Subject").text == item.subject


def answer_bytes(sim: Simulator, mailbox: str, operation: str, body: str) -> bytes:
    """One operation's answer as the server writes it (without HTTP), fragments spliced in."""
    def run() -> bytes:
        collect_fragments()
        service = sim.directory.get(f"{SERVICE_ACCOUNT}@contoso.com")
        ctx = Context(sim, service, sim.directory.get(mailbox), True, "Exchange2016", None, None, {})  # type: ignore[arg-type]
        el = etree.fromstring(f'<x xmlns:m="{MNS}" xmlns:t="{TNS}">{body}</x>')[0]
        return envelope([asyncio.run(OPERATIONS[operation](ctx, el))])  # type: ignore[list-item]
    return contextvars.copy_context().run(run)


def test_the_hot_reads_answer_what_the_element_tree_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """FindItem, GetItem and SyncFolderItems (in pages, with deletions) of seeded rooms, byte for byte the same
    with the fast path as without it."""
    sim = Simulator(SimulatorConfig())
    standard_org(sim.directory, rooms=3, users=4)
    seed_bookings(sim.directory, seed=11, now=NOW, future_days=60)
    view = shape_xml(VIEW)
    detail = shape_xml(VIEW + DETAIL)
    sync = (f'<m:SyncFolderItems>{detail}<m:SyncFolderId><t:DistinguishedFolderId Id="calendar"/></m:SyncFolderId>'
            '{state}<m:MaxChangesReturned>{size}</m:MaxChangesReturned></m:SyncFolderItems>')
    first = answer_bytes(sim, ROOM, "SyncFolderItems", sync.format(state="", size=512))
    state = etree.fromstring(first).findtext(f".//{{{MNS}}}SyncState")
    singles = [i for i in sim.directory.get(ROOM).calendar.items.values() if i.recurrence is None]
    sim.directory.remove_item(singles[0])  # a tombstone: the next sync reports a Delete ...
    singles[1].subject = "Moved & renamed"
    sim.directory.touch(singles[1])  # ... and an Update
    calls = [("FindItem", f'<m:FindItem Traversal="Shallow">{view}<m:CalendarView StartDate="2026-11-01T00:00:00Z" '
                          'EndDate="2027-02-01T00:00:00Z"/><m:ParentFolderIds><t:DistinguishedFolderId '
                          'Id="calendar"/></m:ParentFolderIds></m:FindItem>')]
    calls.append(("SyncFolderItems", sync.format(state=f"<m:SyncState>{state}</m:SyncState>", size=512)))
    calls.append(("SyncFolderItems", sync.format(state="", size=7)))  # a first page of a round
    fast = [answer_bytes(sim, ROOM, op, body) for op, body in calls]
    found = etree.fromstring(fast[0]).iter(f"{{{TNS}}}ItemId")
    item_ids = "".join(f'<t:ItemId Id="{el.get("Id")}"/>' for el in found)
    get = ("GetItem", f"<m:GetItem>{detail}<m:ItemIds>{item_ids}</m:ItemIds></m:GetItem>")
    fast.append(answer_bytes(sim, ROOM, *get))
    assert b"<t:Delete>" in fast[1] and b"<t:Update>" in fast[1] and fast[2].count(b"<t:Create>") == 7
    assert fast[3].count(b"<t:CalendarItem>") > 50
    monkeypatch.setattr(itemxml, "_plan", lambda shape: None)  # every item as elements, as before the fast path
    slow = [answer_bytes(sim, ROOM, op, body) for op, body in [*calls, get]]
    assert FRAGMENT_PI.encode() not in b"".join(fast)
    for op, a, b in zip([c[0] for c in [*calls, get]], fast, slow, strict=True):
        assert a == b, op
        assert validate(etree.fromstring(a).find(f"{{{SOAP}}}Body")[0]) is None, op


def post(ews, body: str) -> etree._Element:
    """One EWS request as the room (impersonated); the answer is checked against the schema here too."""
    envelope_xml = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" '
                    f'xmlns:t="{TNS}"><s:Header><t:RequestServerVersion Version="Exchange2016"/>'
                    '<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>'
                    f'{ROOM}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></s:Header>'
                    f'<s:Body>{body}</s:Body></s:Envelope>').encode()
    resp = requests.post(ews.url, data=envelope_xml, auth=(f"CONTOSO\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD),
                         timeout=30, headers={"Content-Type": "text/xml; charset=utf-8"})
    assert resp.status_code == 200, resp.text[:600]
    assert FRAGMENT_PI.encode() not in resp.content
    answer = etree.fromstring(resp.content).find(f"{{{SOAP}}}Body")[0]
    assert validate(answer) is None
    return answer


def subjects(answer: etree._Element) -> list[str]:
    return [el.text or "" for el in answer.iter(f"{{{TNS}}}Subject")]


def test_a_changed_item_is_read_changed_through_each_fast_read(ews) -> None:
    shape = shape_xml(VIEW + DETAIL)  # FindItem refuses the attendees: it asks for VIEW alone
    start = dt.datetime(2020, 6, 1, 9, 0, tzinfo=dt.UTC)

    def add() -> CalendarItem:
        d = ews.sim.directory
        room = d.get(ROOM)
        return d.add_item(CalendarItem(d.new_iid(), room, room.calendar, start=start,
                                       end=start + dt.timedelta(hours=1), subject="Created"))
    item = ews.call(add)
    item_id = ids.item_id(item.mailbox.idx, item.iid)
    get_request = f'<m:GetItem>{shape}<m:ItemIds><t:ItemId Id="{item_id}"/></m:ItemIds></m:GetItem>'
    find_request = (f'<m:FindItem Traversal="Shallow">{shape_xml(VIEW)}<m:CalendarView '
                    'StartDate="2020-05-01T00:00:00Z" EndDate="2020-07-01T00:00:00Z"/>'
                    '<m:ParentFolderIds><t:DistinguishedFolderId Id="calendar"/>'
                    '</m:ParentFolderIds></m:FindItem>')
    sync_request = (f'<m:SyncFolderItems>{shape}<m:SyncFolderId><t:DistinguishedFolderId Id="calendar"/>'
                    '</m:SyncFolderId><m:MaxChangesReturned>512</m:MaxChangesReturned></m:SyncFolderItems>')
    for subject in ("Created", "Before & after", "After <the> change \u00e9"):
        if subject != "Created":
            ews.call(lambda s=subject: (setattr(item, "subject", s), ews.sim.directory.touch(item)))
        assert subjects(post(ews, get_request)) == [subject]
        assert subjects(post(ews, find_request)) == [subject]
        assert subjects(post(ews, sync_request)) == [subject]
