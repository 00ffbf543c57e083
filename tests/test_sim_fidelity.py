"""The simulator as clients other than ours see it (issue 8, items 21-26): what Exchange 2016 answers to access
without impersonation, restricted and paged FindFolder, ConvertId, MAPI properties by tag, MimeContent,
the standard folders, CreateFolder/DeleteFolder, GetUserConfiguration and operations out of scope.

Requests go over HTTP, through exchangelib where it can form them and as raw SOAP where it cannot; every raw
request and response is checked against Microsoft's schema here, independently of the simulator's own check.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from exchangelib import DELEGATE, Account, CalendarItem, EWSDateTime, ExtendedProperty, Folder, Q
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorDeleteDistinguishedFolder,
    ErrorFolderExists,
    ErrorItemNotFound,
)
from exchangelib.folders import FolderCollection
from exchangelib.properties import AlternateId
from exchangelib.recurrence import DailyPattern, NumberedPattern, Recurrence
from lxml import etree

from gateway.simulator.schema import MNS, TNS, validate
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD
from tests.conftest import TZ

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ROOM = "room1@contoso.com"
ALICE = "alice@contoso.com"


# -- helpers ---------------------------------------------------------------------------------------------------
def soap(ews: Any, body: str, *, impersonate: str | None = ROOM, account: str = SERVICE_ACCOUNT,
         password: str = SERVICE_PASSWORD) -> etree._Element:
    """Post one EWS request (Basic auth) and return the operation's response element, schema-checked."""
    header = '<t:RequestServerVersion Version="Exchange2016"/>'
    if impersonate:
        header += ('<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>'
                   f'{impersonate}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>')
    envelope = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" '
                f'xmlns:t="{TNS}"><s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>').encode()
    request_problem = validate(etree.fromstring(envelope).find(f"{{{SOAP}}}Body")[0])
    assert request_problem is None, f"the test's own request is invalid: {request_problem}"
    resp = requests.post(ews.url, data=envelope, auth=(f"CONTOSO\\{account}", password), timeout=30,
                         headers={"Content-Type": "text/xml; charset=utf-8"})
    root = etree.fromstring(resp.content)
    answer = root.find(f"{{{SOAP}}}Body")[0]
    assert answer.tag != f"{{{SOAP}}}Fault", f"a SOAP fault, not an EWS response: {resp.text[:600]}"
    assert resp.status_code == 200, resp.text[:600]
    problem = validate(answer)
    assert problem is None, f"response violates the schema: {problem}: {resp.text[:600]}"
    return answer


def codes(answer: etree._Element) -> list[str]:
    return [c.text or "" for c in answer.iter(f"{{{MNS}}}ResponseCode")]


def t(name: str) -> str:
    return f"{{{TNS}}}{name}"


def m(name: str) -> str:
    return f"{{{MNS}}}{name}"


def day_at(days: int, hour: int, minute: int = 0) -> EWSDateTime:
    base = EWSDateTime.now(TZ) + dt.timedelta(days=days)
    return base.replace(hour=hour, minute=minute, second=0, microsecond=0)


def appointment(acc: Account, subject: str, start: EWSDateTime, end: EWSDateTime, **fields: Any) -> CalendarItem:
    item = CalendarItem(account=acc, folder=acc.calendar, subject=subject, start=start, end=end, **fields)
    item.save()
    return item


FOLDER_PROPS = ('<t:AdditionalProperties><t:FieldURI FieldURI="folder:DisplayName"/>'
                '<t:FieldURI FieldURI="folder:FolderClass"/></t:AdditionalProperties>')


def find_folder(ews: Any, restriction: str = "", *, parent: str = "msgfolderroot", view: str = "",
                traversal: str = "Shallow", props: str = FOLDER_PROPS, mailbox: str = ROOM) -> etree._Element:
    return soap(ews, f'<m:FindFolder Traversal="{traversal}"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>'
                     f'{props}</m:FolderShape>{view}'
                     f'{f"<m:Restriction>{restriction}</m:Restriction>" if restriction else ""}'
                     f'<m:ParentFolderIds><t:DistinguishedFolderId Id="{parent}"/></m:ParentFolderIds>'
                     '</m:FindFolder>', impersonate=mailbox)


def names(answer: etree._Element) -> list[str]:
    return [el.text or "" for el in answer.iter(t("DisplayName"))]


def equal_to(uri: str, value: str) -> str:
    return (f'<t:IsEqualTo>{uri}<t:FieldURIOrConstant><t:Constant Value="{value}"/></t:FieldURIOrConstant>'
            '</t:IsEqualTo>')


DISPLAY_NAME = '<t:FieldURI FieldURI="folder:DisplayName"/>'
FOLDER_CLASS = '<t:FieldURI FieldURI="folder:FolderClass"/>'


# -- 21. access without impersonation --------------------------------------------------------------------------
def test_a_mailbox_element_without_impersonation_is_refused(ews):
    """ApplicationImpersonation lets the service account act AS a room; it is not a right on the room's folders:
    Exchange wants delegate (FullAccess) or folder permissions for a <Mailbox> without ExchangeImpersonation."""
    room = ews.room(ROOM)
    start = day_at(3, 9)
    appointment(room, "Walk-in", start, start + dt.timedelta(hours=1))
    assert [i.subject for i in room.calendar.view(start=start, end=start + dt.timedelta(hours=2))] == ["Walk-in"]

    delegate = Account(ROOM, config=ews.config(), access_type=DELEGATE, autodiscover=False, default_timezone=TZ)
    with pytest.raises(ErrorAccessDenied):
        list(delegate.calendar.view(start=start, end=start + dt.timedelta(hours=2)))
    for body in (
        '<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds>'
        f'<t:DistinguishedFolderId Id="calendar"><t:Mailbox><t:EmailAddress>{ROOM}</t:EmailAddress></t:Mailbox>'
        '</t:DistinguishedFolderId></m:FolderIds></m:GetFolder>',
        '<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>'
        f'<m:ParentFolderIds><t:DistinguishedFolderId Id="calendar"><t:Mailbox><t:EmailAddress>{ROOM}'
        '</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId></m:ParentFolderIds></m:FindItem>',
    ):
        assert codes(soap(ews, body, impersonate=None)) == ["ErrorAccessDenied"]

    # An id of the room's folder or item, without impersonation, is refused the same way.
    cal_id = room.calendar.id
    [item] = room.calendar.view(start=start, end=start + dt.timedelta(hours=2))
    with pytest.raises(ErrorAccessDenied):
        list(delegate.fetch(ids=[(item.id, item.changekey)]))
    answer = soap(ews, '<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>'
                       f'<m:FolderIds><t:FolderId Id="{cal_id}"/></m:FolderIds></m:GetFolder>', impersonate=None)
    assert codes(answer) == ["ErrorAccessDenied"]


def test_impersonating_one_mailbox_gives_no_rights_on_another(ews):
    """Impersonating alice means acting as alice, who has only free/busy on a room's calendar."""
    body = ('<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>'
            f'<m:ParentFolderIds><t:DistinguishedFolderId Id="calendar"><t:Mailbox><t:EmailAddress>{ROOM}'
            '</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId></m:ParentFolderIds></m:FindItem>')
    assert codes(soap(ews, body, impersonate=ALICE, account=ORGANIZER_ACCOUNT)) == ["ErrorAccessDenied"]
    # The same request impersonating the room itself is the room reading its own calendar.
    assert codes(soap(ews, body, impersonate=ROOM, account=ORGANIZER_ACCOUNT)) == ["NoError"]


def test_full_access_delegates_read_without_impersonation(ews):
    """Add-MailboxPermission -AccessRights FullAccess: the delegate reaches the mailbox through <Mailbox>."""
    ews.call(ews.sim.directory.grant_full_access, ROOM, f"{SERVICE_ACCOUNT}@contoso.com")
    start = day_at(3, 11)
    appointment(ews.room(ROOM), "Delegated", start, start + dt.timedelta(hours=1))
    delegate = Account(ROOM, config=ews.config(), access_type=DELEGATE, autodiscover=False, default_timezone=TZ)
    assert [i.subject for i in delegate.calendar.view(start=start, end=start + dt.timedelta(hours=1))] == \
        ["Delegated"]
    # Only that room: another room still needs impersonation.
    other = Account("room2@contoso.com", config=ews.config(), access_type=DELEGATE, autodiscover=False,
                    default_timezone=TZ)
    with pytest.raises(ErrorAccessDenied):
        list(other.calendar.view(start=start, end=start + dt.timedelta(hours=1)))


def test_free_busy_and_directory_need_no_impersonation(ews):
    """GetUserAvailability, GetRoomLists, GetRooms and ResolveNames are called as the service account itself."""
    start = day_at(4, 9)
    appointment(ews.room(ROOM), "Busy", start, start + dt.timedelta(hours=1))
    protocol = ews.room(ROOM).protocol
    [info] = protocol.get_free_busy_info(accounts=[(ROOM, "Required", False)], start=start,
                                         end=start + dt.timedelta(hours=3))
    assert [e.busy_type for e in info.calendar_events] == ["Busy"]
    assert list(protocol.get_roomlists())
    answer = soap(ews, '<m:ResolveNames ReturnFullContactData="false"><m:UnresolvedEntry>room1'
                       '</m:UnresolvedEntry></m:ResolveNames>', impersonate=None)
    assert codes(answer) == ["NoError"]


# -- 22. FindFolder restrictions and paging -------------------------------------------------------------------
def test_find_folder_by_display_name_returns_only_that_folder(ews):
    answer = find_folder(ews, equal_to(DISPLAY_NAME, "Inbox"))
    assert names(answer) == ["Inbox"]
    root = answer.find(f".//{m('RootFolder')}")
    assert (root.get("TotalItemsInView"), root.get("IncludesLastItemInRange")) == ("1", "true")
    assert names(find_folder(ews, equal_to(DISPLAY_NAME, "No such folder"))) == []

    # exchangelib's filter() is the same FindFolder restriction.
    room = ews.room(ROOM)
    found = list(FolderCollection(account=room, folders=[room.msg_folder_root]).find_folders(q=Q(name="Drafts")))
    assert [f.name for f in found] == ["Drafts"]


def test_find_folder_restrictions_combine(ews):
    assert names(find_folder(ews, equal_to(FOLDER_CLASS, "IPF.Appointment"))) == ["Calendar"]
    contains = ('<t:Contains ContainmentMode="Substring" ContainmentComparison="IgnoreCase">'
                f'{DISPLAY_NAME}<t:Constant Value="items"/></t:Contains>')
    assert sorted(names(find_folder(ews, contains))) == ["Deleted Items", "Sent Items"]
    both = f'<t:And>{contains}<t:Not>{equal_to(DISPLAY_NAME, "Sent Items")}</t:Not></t:And>'
    assert names(find_folder(ews, both)) == ["Deleted Items"]
    either = f'<t:Or>{equal_to(DISPLAY_NAME, "Inbox")}{equal_to(DISPLAY_NAME, "Outbox")}</t:Or>'
    assert sorted(names(find_folder(ews, either))) == ["Inbox", "Outbox"]
    everything = names(find_folder(ews))
    assert "Calendar" in everything and len(everything) > 5
    assert sorted(names(find_folder(ews, f"<t:Not>{equal_to(DISPLAY_NAME, 'Inbox')}</t:Not>"))) == \
        sorted(n for n in everything if n != "Inbox")


def test_find_folder_pages_with_max_entries_returned(ews):
    everything = names(find_folder(ews))
    seen: list[str] = []
    offset = 0
    while True:
        answer = find_folder(ews, view=f'<m:IndexedPageFolderView MaxEntriesReturned="3" Offset="{offset}" '
                                       'BasePoint="Beginning"/>')
        root = answer.find(f".//{m('RootFolder')}")
        page = names(answer)
        assert len(page) <= 3
        assert root.get("TotalItemsInView") == str(len(everything))
        seen += page
        offset = int(root.get("IndexedPagingOffset"))
        assert offset == len(seen)
        if root.get("IncludesLastItemInRange") == "true":
            break
        assert len(page) == 3
    assert seen == everything


# -- 23. ConvertId -----------------------------------------------------------------------------------------
def convert(ews: Any, ident: str, source: str, destination: str, mailbox: str = ROOM) -> etree._Element:
    return soap(ews, f'<m:ConvertId DestinationFormat="{destination}"><m:SourceIds>'
                     f'<t:AlternateId Format="{source}" Id="{ident}" Mailbox="{mailbox}"/></m:SourceIds>'
                     '</m:ConvertId>')


def alternate(answer: etree._Element) -> tuple[str, str, str]:
    assert codes(answer) == ["NoError"], etree.tostring(answer)
    alt = answer.find(f".//{m('AlternateId')}")
    assert alt is not None, etree.tostring(answer)
    return alt.get("Id", ""), alt.get("Format", ""), alt.get("Mailbox", "")


def test_convert_id_of_a_folder_id_the_server_issued(ews):
    room = ews.room(ROOM)
    folder_id = room.calendar.id
    entry_id, fmt, mailbox = alternate(convert(ews, folder_id, "EwsId", "EntryId"))
    assert (fmt, mailbox) == ("EntryId", ROOM)
    raw = base64.b64decode(entry_id)
    assert len(raw) == 46 and raw[:4] == b"\x00\x00\x00\x00"  # a MAPI folder entry id (flags, store, type...)
    hex_id, fmt, _ = alternate(convert(ews, folder_id, "EwsId", "HexEntryId"))
    assert fmt == "HexEntryId" and binascii.unhexlify(hex_id) == raw
    for source, ident in (("EntryId", entry_id), ("HexEntryId", hex_id)):
        assert alternate(convert(ews, ident, source, "EwsId")) == (folder_id, "EwsId", ROOM)
    for other in ("EwsLegacyId", "OwaId", "StoreId"):
        converted, fmt, _ = alternate(convert(ews, folder_id, "EwsId", other))
        assert fmt == other and converted != folder_id
        assert alternate(convert(ews, converted, other, "EwsId"))[0] == folder_id
        assert alternate(convert(ews, converted, other, "HexEntryId"))[0] == hex_id

    # exchangelib's convert_ids gives the same answer.
    [converted] = room.protocol.convert_ids([AlternateId(id=folder_id, format="EwsId", mailbox=ROOM)],
                                            destination_format="EntryId")
    assert (converted.id, converted.mailbox) == (entry_id, ROOM)


def test_convert_id_of_an_item_id_round_trips(ews):
    room = ews.room(ROOM)
    start = day_at(5, 9)
    item = appointment(room, "Convert me", start, start + dt.timedelta(hours=1))
    entry_id, _, mailbox = alternate(convert(ews, item.id, "EwsId", "EntryId"))
    assert mailbox == ROOM and len(base64.b64decode(entry_id)) == 70  # a MAPI message entry id
    assert alternate(convert(ews, entry_id, "EntryId", "EwsId"))[0] == item.id
    # A malformed id still answers ErrorInvalidIdMalformed (exchangelib's version probe relies on it).
    answer = convert(ews, "AAAA", "EwsId", "EntryId")
    assert codes(answer) == ["ErrorInvalidIdMalformed"]


# -- 24. extended MAPI properties by tag ---------------------------------------------------------------------
def ext(tag: str, ptype: str) -> str:
    return f'<t:ExtendedFieldURI PropertyTag="{tag}" PropertyType="{ptype}"/>'


PID_LID_RECURRING = '<t:ExtendedFieldURI DistinguishedPropertySetId="Appointment" PropertyId="33315" ' \
                    'PropertyType="Boolean"/>'
PID_LID_RECURRING_BY_GUID = '<t:ExtendedFieldURI PropertySetId="00062002-0000-0000-C000-000000000046" ' \
                            'PropertyId="33315" PropertyType="Boolean"/>'


def ext_values(el: etree._Element) -> dict[str, str]:
    """ExtendedProperty children of an item or folder: {tag or id: value}."""
    out = {}
    for prop in el.findall(t("ExtendedProperty")):
        uri = prop.find(t("ExtendedFieldURI"))
        key = uri.get("PropertyTag") or uri.get("PropertyId") or uri.get("PropertyName")
        out[key] = prop.findtext(t("Value"))
    return out


def test_folder_properties_by_tag(ews):
    props = (f'<t:AdditionalProperties>{DISPLAY_NAME}{ext("0x3613", "String")}{ext("0x3008", "SystemTime")}'
             f'{ext("0x3001", "String")}</t:AdditionalProperties>')
    answer = soap(ews, f'<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>{props}</m:FolderShape>'
                       '<m:FolderIds><t:DistinguishedFolderId Id="calendar"/></m:FolderIds></m:GetFolder>')
    [folder] = answer.iter(t("CalendarFolder"))
    values = ext_values(folder)
    assert values["0x3613"] == "IPF.Appointment" and values["0x3001"] == "Calendar"
    assert dt.datetime.fromisoformat(values["0x3008"].replace("Z", "+00:00")).tzinfo is not None

    listed = find_folder(ews, props=props)
    classes = {f.findtext(t("DisplayName")): ext_values(f).get("0x3613") for f in listed.iter(t("Folders"))
               for f in f}
    assert classes["Calendar"] == "IPF.Appointment" and classes["Inbox"] == "IPF.Note"
    # A restriction on the container class matches what GetFolder shows.
    by_class = find_folder(ews, equal_to(ext("0x3613", "String"), "IPF.Appointment"))
    assert names(by_class) == ["Calendar"]


def item_props(ews: Any, item_id: str, props: str) -> etree._Element:
    answer = soap(ews, f'<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape><t:AdditionalProperties>'
                       f'{props}</t:AdditionalProperties></m:ItemShape><m:ItemIds><t:ItemId Id="{item_id}"/>'
                       '</m:ItemIds></m:GetItem>')
    assert codes(answer) == ["NoError"], etree.tostring(answer)
    return answer.find(f".//{m('Items')}")[0]


def test_item_properties_by_tag_and_pid_lid_recurring(ews):
    room = ews.room(ROOM)
    start = day_at(6, 9)
    single = appointment(room, "Single one", start, start + dt.timedelta(hours=1))
    series = appointment(room, "Daily one", start + dt.timedelta(hours=2), start + dt.timedelta(hours=3),
                         recurrence=Recurrence(pattern=DailyPattern(interval=1),
                                               boundary=NumberedPattern(start=start.date(), number=3)))
    props = (f'{ext("0x0037", "String")}{ext("0x3008", "SystemTime")}{ext("0x0E23", "Integer")}'
             f'{PID_LID_RECURRING}')
    one = ext_values(item_props(ews, single.id, props))
    two = ext_values(item_props(ews, series.id, props))
    assert (one["0x0037"], one["33315"]) == ("Single one", "false")
    assert (two["0x0037"], two["33315"]) == ("Daily one", "true")
    assert int(one["0x0E23"]) != int(two["0x0E23"])
    assert dt.datetime.fromisoformat(one["0x3008"].replace("Z", "+00:00")) >= \
        dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    assert ext_values(item_props(ews, series.id, PID_LID_RECURRING_BY_GUID))["33315"] == "true"

    # FindItem returns them too, and a restriction on them matches as the values read.
    def find(restriction: str) -> list[str]:
        answer = soap(ews, '<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
                           f'<t:AdditionalProperties>{props}</t:AdditionalProperties></m:ItemShape>'
                           f'<m:Restriction>{restriction}</m:Restriction><m:ParentFolderIds>'
                           '<t:DistinguishedFolderId Id="calendar"/></m:ParentFolderIds></m:FindItem>')
        found = [ext_values(i) for i in answer.iter(t("CalendarItem"))]
        assert all(set(v) == {"0x0037", "0x3008", "0x0E23", "33315"} for v in found), found
        return sorted(v["0x0037"] for v in found)
    assert find(equal_to(PID_LID_RECURRING, "true")) == ["Daily one"]
    assert find(equal_to(PID_LID_RECURRING, "false")) == ["Single one"]
    assert find(equal_to(ext("0x0037", "String"), "Single one")) == ["Single one"]
    assert find(f'<t:IsGreaterThan>{ext("0x0E23", "Integer")}<t:FieldURIOrConstant>'
                f'<t:Constant Value="{one["0x0E23"]}"/></t:FieldURIOrConstant></t:IsGreaterThan>') == ["Daily one"]


def test_update_item_of_the_subject_by_property_tag(ews):
    room = ews.room(ROOM)
    start = day_at(6, 14)
    item = appointment(room, "Old subject", start, start + dt.timedelta(hours=1))
    answer = soap(ews, '<m:UpdateItem ConflictResolution="AlwaysOverwrite" '
                       'SendMeetingInvitationsOrCancellations="SendToNone"><m:ItemChanges><t:ItemChange>'
                       f'<t:ItemId Id="{item.id}"/><t:Updates><t:SetItemField>{ext("0x0037", "String")}'
                       f'<t:CalendarItem><t:ExtendedProperty>{ext("0x0037", "String")}<t:Value>New subject'
                       '</t:Value></t:ExtendedProperty></t:CalendarItem></t:SetItemField></t:Updates>'
                       '</t:ItemChange></m:ItemChanges></m:UpdateItem>')
    assert codes(answer) == ["NoError"]
    item.refresh()
    assert item.subject == "New subject"


class Subject(ExtendedProperty):
    """PR_SUBJECT by tag, as a MAPI-minded client names it."""

    property_tag = 0x0037
    property_type = "String"


@pytest.fixture
def subject_by_tag() -> Iterator[None]:
    CalendarItem.register("mapi_subject", Subject)
    try:
        yield
    finally:
        CalendarItem.deregister("mapi_subject")


def test_exchangelib_reads_and_writes_the_subject_by_tag(ews, subject_by_tag):
    room = ews.room(ROOM)
    start = day_at(6, 16)
    item = appointment(room, "Tagged", start, start + dt.timedelta(hours=1))
    fetched = room.calendar.get(id=item.id)
    assert fetched.mapi_subject == "Tagged"
    fetched.mapi_subject = "Retagged"
    fetched.save(update_fields=["mapi_subject"])
    assert room.calendar.get(id=item.id).subject == "Retagged"


# -- 25. MimeContent -------------------------------------------------------------------------------------------
def ical_lines(data: bytes) -> list[str]:
    """Unfolded iCalendar content lines."""
    text = data.decode("utf-8").replace("\r\n ", "").replace("\r\n\t", "")
    return [line for line in text.split("\r\n") if line]


def ical_value(lines: list[str], name: str) -> str:
    """A property of the first VEVENT."""
    event = lines[lines.index("BEGIN:VEVENT"):lines.index("END:VEVENT")]
    found = [line.split(":", 1)[1] for line in event if re.match(rf"{name}[;:]", line)]
    assert found, f"no {name} in {lines}"
    return found[0]


def test_get_item_with_mime_content_returns_icalendar(ews):
    room = ews.room(ROOM)
    start = day_at(7, 9)
    single = appointment(room, "Mime single", start, start + dt.timedelta(hours=1), location="Room 1")
    series = appointment(room, "Mime series", start + dt.timedelta(hours=2), start + dt.timedelta(hours=3),
                         recurrence=Recurrence(pattern=DailyPattern(interval=1),
                                               boundary=NumberedPattern(start=start.date(), number=4)))
    answer = soap(ews, '<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
                       '<t:IncludeMimeContent>true</t:IncludeMimeContent><t:AdditionalProperties>'
                       '<t:FieldURI FieldURI="calendar:UID"/></t:AdditionalProperties></m:ItemShape><m:ItemIds>'
                       f'<t:ItemId Id="{single.id}"/><t:ItemId Id="{series.id}"/></m:ItemIds></m:GetItem>')
    [one, two] = answer.iter(t("CalendarItem"))
    for el, subject in ((one, "Mime single"), (two, "Mime series")):
        mime = el.find(t("MimeContent"))
        assert mime is not None, etree.tostring(el)
        lines = ical_lines(base64.b64decode(mime.text))
        assert lines[0] == "BEGIN:VCALENDAR" and lines[-1] == "END:VCALENDAR"
        assert "BEGIN:VEVENT" in lines and "END:VEVENT" in lines
        assert ical_value(lines, "UID") == el.findtext(t("UID"))
        assert ical_value(lines, "SUMMARY") == subject
        assert ical_value(lines, "DTSTART") and ical_value(lines, "DTEND")
    single_lines = ical_lines(base64.b64decode(one.find(t("MimeContent")).text))
    event = single_lines[single_lines.index("BEGIN:VEVENT"):]
    assert not any(line.startswith("RRULE") for line in event)
    assert ical_value(single_lines, "LOCATION") == "Room 1"
    rrule = ical_value(ical_lines(base64.b64decode(two.find(t("MimeContent")).text)), "RRULE")
    assert "FREQ=DAILY" in rrule and "COUNT=4" in rrule

    # exchangelib asks for it as a property (item:MimeContent) and gets the same document.
    fetched = room.calendar.get(id=single.id)
    assert ical_value(ical_lines(fetched.mime_content), "SUMMARY") == "Mime single"
    local = start.astimezone(TZ)
    assert ical_value(single_lines, "DTSTART") == local.strftime("%Y%m%dT%H%M%S")


ICS = """BEGIN:VCALENDAR\r
PRODID:-//Other client//EN\r
VERSION:2.0\r
BEGIN:VEVENT\r
UID:ext-uid-4711@example.org\r
SUMMARY:From iCalendar\r
LOCATION:Lobby\r
DTSTART;TZID=W. Europe Standard Time:{start}\r
DTEND;TZID=W. Europe Standard Time:{end}\r
RRULE:FREQ=WEEKLY;COUNT=3;BYDAY={byday}\r
END:VEVENT\r
END:VCALENDAR\r
"""


def test_create_item_from_mime_content(ews):
    """A calendar item given only as iCalendar (exchangelib insists on Start and End, so this is raw SOAP)."""
    room = ews.room(ROOM)
    start = day_at(9, 10)
    ics = ICS.format(start=start.strftime("%Y%m%dT%H%M%S"),
                     end=(start + dt.timedelta(minutes=45)).strftime("%Y%m%dT%H%M%S"),
                     byday=start.strftime("%a").upper()[:2])
    answer = soap(ews, '<m:CreateItem SendMeetingInvitations="SendToNone"><m:SavedItemFolderId>'
                       '<t:DistinguishedFolderId Id="calendar"/></m:SavedItemFolderId><m:Items><t:CalendarItem>'
                       f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(ics.encode()).decode()}'
                       '</t:MimeContent></t:CalendarItem></m:Items></m:CreateItem>')
    assert codes(answer) == ["NoError"], etree.tostring(answer)
    item_id = answer.find(f".//{t('ItemId')}").get("Id")
    fetched = room.calendar.get(id=item_id)
    assert (fetched.subject, fetched.location, fetched.uid) == ("From iCalendar", "Lobby", "ext-uid-4711@example.org")
    assert (fetched.start, fetched.end) == (start, start + dt.timedelta(minutes=45))
    assert fetched.type == "RecurringMaster"
    view = list(room.calendar.view(start=start, end=start + dt.timedelta(days=30)))
    assert [v.start for v in view] == [start + dt.timedelta(weeks=n) for n in range(3)]
    # What GetItem gives back reads in again as the same item.
    again = ical_lines(fetched.mime_content)
    assert ical_value(again, "UID") == "ext-uid-4711@example.org"
    assert "COUNT=3" in ical_value(again, "RRULE")


def test_mime_content_that_is_not_icalendar_is_refused(ews):
    answer = soap(ews, '<m:CreateItem SendMeetingInvitations="SendToNone"><m:Items><t:CalendarItem>'
                       f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(b"hello").decode()}</t:MimeContent>'
                       '</t:CalendarItem></m:Items></m:CreateItem>')
    assert codes(answer) == ["ErrorMimeContentInvalid"]


def update_subject(ews: Any, item_id: str, carrier: str) -> etree._Element:
    return soap(ews, '<m:UpdateItem ConflictResolution="AlwaysOverwrite" '
                     'SendMeetingInvitationsOrCancellations="SendToNone"><m:ItemChanges><t:ItemChange>'
                     f'<t:ItemId Id="{item_id}"/><t:Updates><t:SetItemField><t:FieldURI FieldURI="item:Subject"/>'
                     f'{carrier}</t:SetItemField></t:Updates></t:ItemChange></m:ItemChanges></m:UpdateItem>')


def test_update_item_with_a_generic_item_carrying_one_property(ews):
    room = ews.room(ROOM)
    start = day_at(9, 15)
    item = appointment(room, "Before", start, start + dt.timedelta(hours=1))
    assert codes(update_subject(ews, item.id, "<t:Item><t:Subject>After</t:Subject></t:Item>")) == ["NoError"]
    item.refresh()
    assert item.subject == "After"
    # Exactly one property: two are refused, as Exchange refuses them.
    two = "<t:CalendarItem><t:Subject>Twice</t:Subject><t:Sensitivity>Private</t:Sensitivity></t:CalendarItem>"
    assert codes(update_subject(ews, item.id, two)) == ["ErrorIncorrectUpdatePropertyCount"]
    item.refresh()
    assert item.subject == "After"


# -- 26. standard folders, CreateFolder, DeleteFolder, GetUserConfiguration, operations out of scope ----------
STANDARD = {
    "root": "Folder", "msgfolderroot": "Folder", "calendar": "CalendarFolder", "contacts": "ContactsFolder",
    "deleteditems": "Folder", "drafts": "Folder", "inbox": "Folder", "journal": "Folder", "junkemail": "Folder",
    "notes": "Folder", "outbox": "Folder", "sentitems": "Folder", "tasks": "TasksFolder",
    "conversationhistory": "Folder", "syncissues": "Folder", "conflicts": "Folder", "localfailures": "Folder",
    "serverfailures": "Folder", "searchfolders": "Folder", "recoverableitemsroot": "Folder",
    "recoverableitemsdeletions": "Folder", "recoverableitemsversions": "Folder", "recoverableitemspurges": "Folder",
}


@pytest.mark.parametrize("mailbox", [ROOM, ALICE])
def test_every_mailbox_has_the_standard_folders(ews, mailbox):
    ids = "".join(f'<t:DistinguishedFolderId Id="{name}"/>' for name in STANDARD)
    answer = soap(ews, f'<m:GetFolder><m:FolderShape><t:BaseShape>Default</t:BaseShape></m:FolderShape>'
                       f'<m:FolderIds>{ids}</m:FolderIds></m:GetFolder>', impersonate=mailbox,
                  account=ORGANIZER_ACCOUNT)
    assert codes(answer) == ["NoError"] * len(STANDARD)
    elements = [etree.QName(f[0]).localname for f in answer.iter(m("Folders"))]
    assert elements == list(STANDARD.values())
    # exchangelib's well-known folders resolve.
    acct = ews.organizer(mailbox)
    assert acct.contacts.folder_class == "IPF.Contact"
    assert acct.tasks.folder_class == "IPF.Task"
    assert acct.junk.name == "Junk Email"
    assert acct.notes.folder_class == "IPF.StickyNote"


def test_create_find_and_delete_a_folder(ews):
    room = ews.room(ROOM)
    parent = room.msg_folder_root
    created = Folder(parent=parent, name="Bookings export", folder_class="IPF.Note")
    created.save()
    collection = FolderCollection(account=room, folders=[parent])
    [found] = collection.find_folders(q=Q(name="Bookings export"))
    assert found.id == created.id
    with pytest.raises(ErrorFolderExists):
        Folder(parent=parent, name="Bookings export").save()

    # The found folder is the one deleted; the calendar is untouched.
    start = day_at(10, 9)
    appointment(room, "Still here", start, start + dt.timedelta(hours=1))
    found.delete()
    assert list(collection.find_folders(q=Q(name="Bookings export"))) == []
    answer = soap(ews, '<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>'
                       f'<m:FolderIds><t:FolderId Id="{created.id}"/></m:FolderIds></m:GetFolder>')
    assert codes(answer) == ["ErrorFolderNotFound"]
    assert [i.subject for i in room.calendar.view(start=start, end=start + dt.timedelta(hours=1))] == ["Still here"]


def test_a_distinguished_folder_cannot_be_deleted(ews):
    room = ews.room(ROOM)
    with pytest.raises(ErrorDeleteDistinguishedFolder):
        room.calendar.delete()
    answer = soap(ews, '<m:DeleteFolder DeleteType="HardDelete"><m:FolderIds>'
                       '<t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:DeleteFolder>')
    assert codes(answer) == ["ErrorDeleteDistinguishedFolder"]
    assert room.calendar.name == "Calendar"


def test_a_created_calendar_folder_holds_its_own_items(ews):
    room = ews.room(ROOM)
    answer = soap(ews, '<m:CreateFolder><m:ParentFolderId><t:DistinguishedFolderId Id="calendar"/>'
                       '</m:ParentFolderId><m:Folders><t:CalendarFolder><t:DisplayName>Holds</t:DisplayName>'
                       '</t:CalendarFolder></m:Folders></m:CreateFolder>')
    assert codes(answer) == ["NoError"]
    folder_id = answer.find(f".//{t('FolderId')}").get("Id")
    [holds] = FolderCollection(account=room, folders=[room.calendar]).find_folders(q=Q(name="Holds"))
    assert holds.id == folder_id and holds.folder_class == "IPF.Appointment"
    start = day_at(11, 9)
    CalendarItem(account=room, folder=holds, subject="Held", start=start, end=start + dt.timedelta(hours=1)).save()
    assert [i.subject for i in holds.view(start=start, end=start + dt.timedelta(hours=1))] == ["Held"]
    assert list(room.calendar.view(start=start, end=start + dt.timedelta(hours=1))) == []
    # Deleting a folder with items in it deletes them with it.
    holds.delete()
    answer = soap(ews, '<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
                       f'</m:ItemShape><m:ParentFolderIds><t:FolderId Id="{folder_id}"/></m:ParentFolderIds>'
                       '</m:FindItem>')
    assert codes(answer) == ["ErrorFolderNotFound"]


def test_get_user_configuration_of_an_unknown_configuration(ews):
    answer = soap(ews, '<m:GetUserConfiguration><m:UserConfigurationName Name="NoSuchConfig">'
                       '<t:DistinguishedFolderId Id="calendar"/></m:UserConfigurationName>'
                       '<m:UserConfigurationProperties>All</m:UserConfigurationProperties>'
                       '</m:GetUserConfiguration>')
    assert codes(answer) == ["ErrorItemNotFound"]
    room = ews.room(ROOM)
    with pytest.raises(ErrorItemNotFound):
        room.calendar.get_user_configuration("NoSuchConfig")


@pytest.mark.parametrize("body", [
    '<m:SyncFolderHierarchy><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>'
    '</m:SyncFolderHierarchy>',
    '<m:EmptyFolder DeleteType="HardDelete" DeleteSubFolders="false"><m:FolderIds>'
    '<t:DistinguishedFolderId Id="deleteditems"/></m:FolderIds></m:EmptyFolder>',
    '<m:GetInboxRules/>',
    '<m:GetDelegate IncludePermissions="false"><m:Mailbox><t:EmailAddress>room1@contoso.com</t:EmailAddress>'
    '</m:Mailbox></m:GetDelegate>',
    '<m:GetAttachment><m:AttachmentIds><t:AttachmentId Id="AAAA"/></m:AttachmentIds></m:GetAttachment>',
    '<m:MoveItem><m:ToFolderId><t:DistinguishedFolderId Id="deleteditems"/></m:ToFolderId><m:ItemIds>'
    '<t:ItemId Id="AAAA"/></m:ItemIds></m:MoveItem>',
    '<m:GetUserOofSettingsRequest><t:Mailbox><t:Address>room1@contoso.com</t:Address></t:Mailbox>'
    '</m:GetUserOofSettingsRequest>',
], ids=["SyncFolderHierarchy", "EmptyFolder", "GetInboxRules", "GetDelegate", "GetAttachment", "MoveItem",
        "GetUserOofSettings"])
def test_an_operation_out_of_scope_answers_a_schema_valid_ews_error(ews, body):
    answer = soap(ews, body)
    found = codes(answer)
    assert found and all(c != "NoError" for c in found), etree.tostring(answer)


def test_deleting_a_folder_the_caller_cannot_reach_is_refused(ews):
    # room2's calendar, with the service account impersonating room1.
    room2_calendar = ews.room("room2@contoso.com").calendar.id
    answer = soap(ews, '<m:DeleteFolder DeleteType="HardDelete"><m:FolderIds>'
                       f'<t:FolderId Id="{room2_calendar}"/></m:FolderIds></m:DeleteFolder>')
    assert codes(answer) == ["ErrorAccessDenied"]
    assert ews.room("room2@contoso.com").calendar.name == "Calendar"
