"""The EWS read path on the wire (gateway/sources/ews/wire.py): the requests are the ones exchangelib would send, with
the headers Exchange routes and authorizes by; paging limits hold; throttling, errors and hostile answers mean what
they meant through exchangelib; every request is counted by operation and answer.

Real parts: exchangelib's own request building for the comparison, the simulator over HTTP + NTLM, and for answers
no Exchange gives on request (a response message saying ErrorServerBusy, a DTD with entities, a web page) a small
aiohttp server speaking EWS over a real socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from exchangelib import EWSDateTime, EWSTimeZone
from lxml import etree

from gateway.errors import GatewayError, HttpError, MailboxNotFound, RequestFailed, Throttled
from gateway.model import Window
from gateway.simulator.notifications import affinity_cookie
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews import source as ews_source
from gateway.sources.ews import transport
from gateway.sources.ews.mapping import DETAIL_FIELDS, SYNC_FIELDS, VIEW_FIELDS
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.wire import MNS, SOAP, TNS, Wire, encode, exchangelib_request
from tests.conftest import SimFixture
from tests.running_gateway import ROOM1, ROOM2, appointment, soon

OPERATIONS = ("GetFolder", "SyncFolderItems", "FindItem", "GetItem")


def make_source(url: str, **settings: Any) -> EwsSource:
    return EwsSource(EwsSettings(ews_url=url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                                 **{"max_workers": 2, "timeout": 10, **settings}), SERVICE_PASSWORD)


def window() -> Window:
    return Window(soon() - timedelta(days=1), soon() + timedelta(days=30))


async def import_room(src: EwsSource, room: str) -> list[Any]:
    """What an import asks of the source for one room."""
    await src.verify(room)
    state: str | None = None
    while True:
        page = await src.changes(room, state, detailed=False)
        state = page.sync_state
        if not page.more:
            break
    return await src.read_window(room, window())


# -- the requests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["Exchange2013", "Exchange2013_SP1", "Exchange2016"])
async def test_each_read_request_is_byte_for_byte_the_one_exchangelib_builds(version: str) -> None:
    src = EwsSource(EwsSettings(ews_url="http://127.0.0.1:9/EWS/Exchange.asmx", username="CONTOSO\\svc",
                                version=version, default_timezone="Europe/Berlin"), "secret")
    try:
        acct = src.account("Room.With&Odd<Name>@contoso.com")
        tz = acct.default_timezone
        start = EWSDateTime(2026, 12, 7, 9, 30, 15, 123456, tzinfo=tz)
        end = EWSDateTime(2027, 3, 1, 0, 0, tzinfo=tz)
        cases: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
            ("GetFolder", (), {}),
            ("FindItem", VIEW_FIELDS, {"start": start, "end": end, "max_entries": 1000}),
            ("GetItem", VIEW_FIELDS + DETAIL_FIELDS, {"ids": ["AAMkA=", 'id"with<odd>&chars', "tab\there\nline\rend"]}),
            ("GetItem", VIEW_FIELDS + DETAIL_FIELDS, {"ids": ["AAMkA="]}),
            ("SyncFolderItems", SYNC_FIELDS, {"sync_state": None, "max_changes": 512}),
            ("SyncFolderItems", SYNC_FIELDS + VIEW_FIELDS, {"sync_state": "H4sIAAA+/=", "max_changes": 1}),
            ("Subscribe", (), {}),
        ]
        wire = Wire()
        for operation, fields, values in cases:
            ours = wire.request(acct, operation, fields, version, encode(**values))
            theirs = exchangelib_request(acct, operation, fields, version, **values)
            assert ours == theirs, operation
            head = etree.fromstring(ours).find(f"{{{SOAP}}}Header")
            assert head is not None
            assert head.find(f"{{{TNS}}}RequestServerVersion").get("Version") == version
            assert head.findtext(f"{{{TNS}}}ExchangeImpersonation/{{{TNS}}}ConnectingSID/"
                                 f"{{{TNS}}}PrimarySmtpAddress") == "room.with&odd<name>@contoso.com"
    finally:
        await src.close()


async def test_a_calendar_view_asks_only_for_what_a_booking_is_made_of() -> None:
    # Every field asked for is bytes Exchange writes and the gateway parses, for every instance of every room.
    src = EwsSource(EwsSettings(ews_url="http://127.0.0.1:9/EWS/Exchange.asmx", username="CONTOSO\\svc",
                                default_timezone="Europe/Berlin"), "secret")
    try:
        acct = src.account(ROOM2)
        tz = acct.default_timezone
        body = Wire().request(acct, "FindItem", VIEW_FIELDS, "Exchange2013_SP1", encode(
            start=EWSDateTime(2026, 12, 7, tzinfo=tz), end=EWSDateTime(2027, 1, 7, tzinfo=tz), max_entries=1000))
    finally:
        await src.close()
    asked = {el.get("FieldURI") for el in etree.fromstring(body).iter(f"{{{TNS}}}FieldURI")}
    assert "calendar:Location" not in asked and "calendar:IsMeeting" not in asked
    assert {"calendar:Start", "calendar:End", "item:Subject", "calendar:CalendarItemType"} <= asked
    # The meeting's zone is StartTimeZone's; the one exchangelib adds for End is never read.
    assert "calendar:StartTimeZone" in asked and "calendar:EndTimeZone" not in asked


# -- reading an answer as exchangelib does ----------------------------------------------------------------------------
_MESSAGES = {  # a GetItem response message each, as Exchange writes them and as it may
    "success": '<m:ResponseCode>NoError</m:ResponseCode><m:Items><t:CalendarItem/></m:Items>',
    "success without the container": "<m:ResponseCode>NoError</m:ResponseCode>",
    "code after the text": "<m:MessageText>fine</m:MessageText><m:ResponseCode>NoError</m:ResponseCode><m:Items/>",
    "an item gone": "<m:MessageText>gone</m:MessageText><m:ResponseCode>ErrorItemNotFound</m:ResponseCode>",
    "success saying an error": "<m:ResponseCode>ErrorItemNotFound</m:ResponseCode><m:Items/>",
    "empty code": "<m:ResponseCode/><m:Items/>",
}


@pytest.mark.parametrize("name", sorted(_MESSAGES))
@pytest.mark.parametrize("response_class", ["Success", "Error"])
@pytest.mark.parametrize("container", [f"{{{MNS}}}Items", None])
async def test_a_response_message_reads_as_exchangelib_reads_it(name: str, response_class: str,
                                                                 container: str | None) -> None:
    """wire._container answers Success/NoError itself (every message of a GetItem answer, one per item): the same
    container, value or error as exchangelib's reading, whatever the message says."""
    from exchangelib.services import GetItem
    from exchangelib.services.common import EWSService

    from gateway.sources.ews import wire

    def read(fn: Callable[[], Any]) -> Any:
        try:
            found = fn()
        except Exception as e:
            return ("raised", type(e), str(e))
        if isinstance(found, etree._Element):
            return ("element", found.tag, etree.tostring(found))
        return ("value", type(found), str(found))
    message = etree.fromstring(f'<m:GetItemResponseMessage xmlns:m="{MNS}" xmlns:t="{TNS}" ResponseClass='
                               f'"{response_class}">{_MESSAGES[name]}</m:GetItemResponseMessage>')
    src = EwsSource(EwsSettings(ews_url="http://127.0.0.1:9/EWS/Exchange.asmx", username="CONTOSO\\svc",
                                default_timezone="Europe/Berlin"), "secret")
    try:
        svc = GetItem(account=src.account(ROOM1))
        ours = read(lambda: wire._container(svc, message, container))
        theirs = read(lambda: EWSService._get_element_container(svc, message=message, name=container))
    finally:
        await src.close()
    if theirs[0] == "value" and theirs[1] is bool:
        theirs = ("value", type(None), "None")  # (a message with nothing in it: None, as before)
    assert ours == theirs


async def test_the_accounts_version_follows_the_servers_as_exchangelib_reads_it() -> None:
    """A server's ServerVersionInfo is read once per version it says (wire._update_version); the account's version
    is what exchangelib reads from each answer, the server's build and API version or the requested one."""
    from exchangelib.version import Version

    from gateway.sources.ews import wire

    src = EwsSource(EwsSettings(ews_url="http://127.0.0.1:9/EWS/Exchange.asmx", username="CONTOSO\\svc",
                                default_timezone="Europe/Berlin"), "secret")
    try:
        first, second = src.account(ROOM1), src.account(ROOM2)

        def header(build: str, version: str | None = None) -> etree._Element:
            major, minor, major_build, minor_build = build.split(".")
            said = f' Version="{version}"' if version else ""
            return etree.fromstring(
                f'<s:Header xmlns:s="{SOAP}"><h:ServerVersionInfo xmlns:h="{TNS}" MajorVersion="{major}" '
                f'MinorVersion="{minor}" MajorBuildNumber="{major_build}" MinorBuildNumber="{minor_build}"{said}/>'
                "</s:Header>")
        cases = [(first, "Exchange2013_SP1", header("15.1.2507.6", "V2017_07_11")),
                 (second, "Exchange2013_SP1", header("15.1.2507.6", "V2017_07_11")),  # the same, for another room
                 (first, "Exchange2016", header("15.1.2507.6", "V2017_07_11")),  # another version requested
                 (first, "Exchange2013_SP1", header("15.0.1497.2")),  # a server that sends no Version
                 (second, "Exchange2016", header("15.2.1118.7", "Exchange2016"))]  # another server
        for acct, requested, h in cases:
            wire._update_version(acct, requested, h)
            expected = Version.from_soap_header(requested_api_version=requested, header=h)
            assert (acct.version.build, acct.version.api_version) == (expected.build, expected.api_version)
        # A header that is not one ServerVersionInfo of attributes is read by exchangelib alone, and kept out.
        before = first.version
        wire._update_version(first, "Exchange2013_SP1", etree.fromstring(f'<s:Header xmlns:s="{SOAP}"/>'))
        assert first.version is before
    finally:
        await src.close()


async def test_every_read_request_carries_the_rooms_anchor_and_impersonation(ews: SimFixture) -> None:
    headers: list[tuple[str, dict[str, str]]] = []
    bodies: list[tuple[str, bytes]] = []
    ews.call(lambda: setattr(ews.sim, "header_recorder", lambda op, h: headers.append((op, h))))
    ews.call(lambda: setattr(ews.sim, "recorder", lambda op, req, resp: bodies.append((op, req))))
    appointment(ews, ROOM2, "Anchored", soon())
    src = make_source(ews.url)
    try:
        bookings = await import_room(src, ROOM2)
    finally:
        await src.close()
    assert [b.subject for b in bookings] == ["Anchored"]
    assert {op for op, _ in headers} >= set(OPERATIONS)
    for op, h in headers:
        # As exchangelib 5.6 sends them for these operations: the room as anchor, no request for server affinity.
        assert h.get("X-AnchorMailbox") == ROOM2, (op, h)
        assert "X-PreferServerAffinity" not in h, (op, h)
    for op, body in bodies:
        head = etree.fromstring(body).find(f"{{{SOAP}}}Header")
        assert head is not None
        assert head.findtext(f".//{{{TNS}}}PrimarySmtpAddress") == ROOM2, op
        assert head.find(f"{{{TNS}}}RequestServerVersion").get("Version") == "Exchange2013_SP1", op
        assert head.find(f"{{{TNS}}}TimeZoneContext/{{{TNS}}}TimeZoneDefinition").get("Id") == \
            EWSTimeZone("Europe/Berlin").ms_id, op


# -- paging limits --------------------------------------------------------------------------------------------------
async def test_a_calendar_view_that_comes_back_full_is_split_until_nothing_is_left_out(
        ews: SimFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    subjects = {f"Busy {n}" for n in range(9)}
    for n in range(9):
        appointment(ews, ROOM1, f"Busy {n}", soon(26 + 3 * n))
    monkeypatch.setattr(ews_source, "FIND_COUNT_LIMIT", 4)  # Exchange's is 1000: the same rule, smaller
    src = make_source(ews.url)
    try:
        bookings = await src.read_window(ROOM1, window())
        views = src.calls.counts.get(("FindItem", "NoError"), 0)
    finally:
        await src.close()
    assert {b.subject for b in bookings} == subjects and len(bookings) == 9
    assert views > 3  # the window was asked in pieces, each answered whole


async def test_meetings_are_read_in_chunks_of_get_item_chunk(ews: SimFixture) -> None:
    for n in range(5):
        appointment(ews, ROOM1, f"Chunked {n}", soon(26 + 2 * n))
    src = make_source(ews.url, get_item_chunk=2)
    try:
        bookings = await src.read_window(ROOM1, window())
        counts = dict(src.calls.counts)
    finally:
        await src.close()
    assert len(bookings) == 5 and all(b.organizer is not None for b in bookings)
    assert counts == {("FindItem", "NoError"): 1, ("GetItem", "NoError"): 3}


async def test_changes_come_in_pages_of_sync_page_size_until_the_last(ews: SimFixture) -> None:
    uids = {appointment(ews, ROOM1, f"Paged {n}", soon(26 + 2 * n)) for n in range(5)}
    src = make_source(ews.url, sync_page_size=2)
    try:
        first = await src.changes(ROOM1, None)
        seen, state, pages = set(first.changed_uids), first.sync_state, 1
        more = first.more
        while more:
            page = await src.changes(ROOM1, state)
            seen |= page.changed_uids
            state, more, pages = page.sync_state, page.more, pages + 1
            assert len(page.changed_uids) <= 2
    finally:
        await src.close()
    assert len(first.changed_uids) == 2 and first.more
    assert uids <= seen and pages >= 3


# -- answers: counted, and meaning what they meant -------------------------------------------------------------------
async def test_each_request_is_counted_by_operation_and_answer(ews: SimFixture) -> None:
    appointment(ews, ROOM1, "Counted", soon())
    src = make_source(ews.url)
    try:
        await import_room(src, ROOM1)
        with pytest.raises(MailboxNotFound):
            await src.read_window("nobody@contoso.com", window())
        counts = dict(src.calls.counts)
    finally:
        await src.close()
    assert counts == {("GetFolder", "NoError"): 1, ("SyncFolderItems", "NoError"): 1, ("FindItem", "NoError"): 1,
                      ("GetItem", "NoError"): 1, ("FindItem", "ErrorNonExistentMailbox"): 1}


async def test_throttling_of_a_window_read_is_throttled_with_exchanges_back_off(ews: SimFixture) -> None:
    src = make_source(ews.url)
    try:
        await src.verify(ROOM1)  # the session is authenticated; from now on every request is refused as busy
        ews.call(lambda: (setattr(ews.sim.throttle, "max_concurrent", 0),
                          setattr(ews.sim.throttle, "back_off_ms", 1500)))
        for read in (lambda: src.read_window(ROOM1, window()), lambda: src.changes(ROOM1, None)):
            with pytest.raises(Throttled) as caught:
                await read()
            assert caught.value.back_off == 1.5
        assert src.calls.counts[("FindItem", "ErrorServerBusy")] == 1
    finally:
        await src.close()


Answer = Callable[[str], tuple[int, bytes, str]]


def envelope(body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" xmlns:t="{TNS}">'
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


def success(operation: str, inner: str) -> str:
    return (f"<m:{operation}Response><m:ResponseMessages><m:{operation}ResponseMessage ResponseClass=\"Success\">"
            f"<m:ResponseCode>NoError</m:ResponseCode>{inner}</m:{operation}ResponseMessage></m:ResponseMessages>"
            f"</m:{operation}Response>")


def calendar_item(subject: str = "Stub meeting") -> str:
    start = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    return (f'<t:CalendarItem><t:ItemId Id="stub1" ChangeKey="ck"/><t:Subject>{subject}</t:Subject>'
            f"<t:Start>{start.isoformat().replace('+00:00', 'Z')}</t:Start>"
            f"<t:End>{(start + timedelta(hours=1)).isoformat().replace('+00:00', 'Z')}</t:End>"
            "<t:CalendarItemType>Single</t:CalendarItemType><t:UID>stub-uid-1</t:UID></t:CalendarItem>")


@pytest.fixture
async def stub(aiohttp_server: Any) -> Callable[[Answer], Awaitable[str]]:
    """An EWS endpoint that answers each operation as ``answer(operation)`` says: (status, body, content type)."""
    async def start(answer: Answer) -> str:
        async def handle(request: web.Request) -> web.Response:
            data = await request.read()
            op = next((o for o in OPERATIONS if f"<m:{o}".encode() in data), "?")
            status, body, ctype = answer(op)
            return web.Response(status=status, body=body, content_type=ctype)
        app = web.Application()
        app.router.add_post("/EWS/Exchange.asmx", handle)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}/EWS/Exchange.asmx"
    return start


def ordinary(op: str) -> tuple[int, bytes, str]:
    if op == "FindItem":
        return 200, envelope(success("FindItem", '<m:RootFolder TotalItemsInView="1" IncludesLastItemInRange='
                                     f'"true"><t:Items>{calendar_item()}</t:Items></m:RootFolder>')), "text/xml"
    if op == "GetItem":
        return 200, envelope(success("GetItem", f"<m:Items>{calendar_item()}</m:Items>")), "text/xml"
    return 200, envelope(success("GetFolder", '<m:Folders><t:CalendarFolder><t:FolderId Id="f"/>'
                                 "</t:CalendarFolder></m:Folders>")), "text/xml"


async def test_a_response_message_saying_server_busy_keeps_its_back_off(stub: Any) -> None:
    def answer(op: str) -> tuple[int, bytes, str]:
        if op != "FindItem":
            return ordinary(op)
        return 200, envelope(
            '<m:FindItemResponse><m:ResponseMessages><m:FindItemResponseMessage ResponseClass="Error">'
            "<m:MessageText>The server cannot service this request right now.</m:MessageText>"
            "<m:ResponseCode>ErrorServerBusy</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
            '<m:MessageXml><t:Value Name="BackOffMilliseconds">2500</t:Value></m:MessageXml>'
            "</m:FindItemResponseMessage></m:ResponseMessages></m:FindItemResponse>"), "text/xml"
    src = make_source(await stub(answer), auth="basic")
    try:
        with pytest.raises(Throttled) as caught:
            await src.read_window(ROOM1, window())
        assert src.calls.counts == {("FindItem", "ErrorServerBusy"): 1}
    finally:
        await src.close()
    assert caught.value.back_off == 2.5


async def test_an_answer_with_entities_expands_none_and_reads_no_file(stub: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    def answer(op: str) -> tuple[int, bytes, str]:
        if op != "FindItem":
            return ordinary(op)
        doctype = (f'<!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "file://{secret}"><!ENTITY a "aaaaaaaaaa">'
                   '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">'
                   '<!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"><!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">]>')
        body = envelope(success("FindItem", '<m:RootFolder TotalItemsInView="1" IncludesLastItemInRange="true">'
                                f"<t:Items>{calendar_item('Hi &xxe; &e;')}</t:Items></m:RootFolder>"))
        head, rest = body.split(b"?>", 1)
        return 200, head + b"?>" + doctype.encode() + rest, "text/xml"
    src = make_source(await stub(answer), auth="basic")
    try:
        bookings = await src.read_window(ROOM1, window())
    finally:
        await src.close()
    assert len(bookings) == 1
    subject = bookings[0].subject or ""
    assert "TOP-SECRET" not in subject and "aaaaaaaaaa" not in subject


@pytest.mark.parametrize("page", [b"<html><body><h1>Welcome</h1></body></html>", b"Service temporarily moved"])
async def test_an_answer_that_is_not_ews_is_http_error_did_not_answer_as_ews(stub: Any, page: bytes) -> None:
    src = make_source(await stub(lambda op: (200, page, "text/html")), auth="basic")
    try:
        with pytest.raises(GatewayError) as caught:
            await src.read_window(ROOM1, window())
    finally:
        await src.close()
    assert isinstance(caught.value, HttpError) and "did not answer as Exchange Web Services" in str(caught.value)


async def test_a_first_sync_of_a_room_without_a_calendar_fails_as_its_verification_does(ews: SimFixture) -> None:
    # A first SyncFolderItems (no state sent) answers ErrorSyncFolderNotFound for a missing calendar: there is no
    # state to be invalid, so it is the calendar that is not found, as GetFolder says it (the coordinator verifies a
    # room that has never been imported by its import's first call).
    ews.call(lambda: ews.sim.directory.get(ROOM1).folders.pop("calendar"))
    src = make_source(ews.url)
    try:
        with pytest.raises(GatewayError) as verified:
            await src.verify(ROOM1)
        with pytest.raises(GatewayError) as synced:
            await src.changes(ROOM1, None, detailed=False)
    finally:
        await src.close()
    assert type(synced.value) is type(verified.value) and synced.value.key == verified.value.key == "not_found"
    assert "calendar" in str(synced.value) and ROOM1 in str(synced.value)


async def test_an_answer_cut_off_midway_is_a_transport_failure_not_a_half_read(aiohttp_server: Any) -> None:
    # The body is read in one piece (wire._read_body): a connection that drops before the announced length has
    # arrived is the failure requests reported when it read the body itself (never a parse of half an answer), and
    # it says so (exchangelib names it ErrorTimeoutExpired).
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/xml", "Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(envelope(success("FindItem", '<m:RootFolder TotalItemsInView="1" IncludesLastItemInRange='
                                          '"true"><t:Items>'))[:400])
        assert request.transport is not None
        request.transport.close()
        return resp
    app = web.Application()
    app.router.add_post("/EWS/Exchange.asmx", handle)
    server = await aiohttp_server(app)
    src = make_source(f"http://127.0.0.1:{server.port}/EWS/Exchange.asmx", auth="basic")
    try:
        with pytest.raises(GatewayError) as caught:
            await src.read_window(ROOM1, window())
    finally:
        await src.close()
    e = caught.value
    assert isinstance(e, RequestFailed) and e.key == "exchange_error"
    assert "broke while Exchange answered for room1@contoso.com" in str(e) and "IncompleteRead(400 bytes read" in str(e)
    assert "proxy or load balancer" in (e.remedy or "")


# -- straight on the session's connection pool (gateway/sources/ews/transport.py) ---------------------------------
# It sends what requests would have sent, keeps the session's cookies both ways, lets requests_ntlm authenticate a
# connection that has not, and fails as requests' way fails.
ENDPOINT = "/EWS/Exchange.asmx"


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many reads went each way: straight on the pool, or through requests' Session.send."""
    seen = {"pool": 0, "requests": 0}
    post, send = transport.post, requests.Session.send

    def counted_post(*args: Any, **kwargs: Any) -> Any:
        r = post(*args, **kwargs)
        if r is not None:
            seen["pool"] += 1
        return r

    def counted_send(self: requests.Session, *args: Any, **kwargs: Any) -> Any:
        seen["requests"] += 1
        return send(self, *args, **kwargs)
    monkeypatch.setattr(transport, "post", counted_post)
    monkeypatch.setattr(requests.Session, "send", counted_send)
    return seen


async def test_a_connection_ntlm_has_not_authenticated_goes_requests_way_once_then_reads_skip_it(
        ews: SimFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    appointment(ews, ROOM2, "Straight", soon())
    seen = _spy(monkeypatch)
    src = make_source(ews.url, max_workers=1)
    try:
        first = await import_room(src, ROOM2)
        again = await import_room(src, ROOM2)
    finally:
        await src.close()
    assert [b.subject for b in first] == [b.subject for b in again] == ["Straight"]
    # The first read found the connection unauthenticated (401): requests_ntlm's handshake on it, through requests;
    # every read after it went straight on the authenticated connection.
    assert seen["requests"] == 1, seen
    assert seen["pool"] >= 7, seen


async def test_straight_reads_over_tls_verify_the_certificate_with_the_trusted_bundle(
        sim_factory: Callable[..., SimFixture], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = sim_factory(tls=True)
    ca = tmp_path / "simulator-ca.pem"
    ca.write_bytes(tls.thread.cert_pem or b"")
    seen = _spy(monkeypatch)
    src = make_source(tls.url, ca_bundle=str(ca), max_workers=1)
    try:
        await import_room(src, ROOM1)
        await import_room(src, ROOM1)
        pools = [route.pool for route in list(transport._routes.values())
                 if route is not None and route.pool.scheme == "https"]
    finally:
        await src.close()
    assert seen["requests"] == 1 and seen["pool"] >= 5, seen
    # The pool the reads went to checks the server's certificate against the bundle given for this host.
    assert pools and all(p.cert_reqs == "CERT_REQUIRED" and p.ca_certs == str(ca) for p in pools)


async def test_a_basic_auth_session_keeps_requests_way(ews: SimFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch)
    src = make_source(ews.url, auth="basic")
    try:
        await import_room(src, ROOM1)
    finally:
        await src.close()
    assert seen["pool"] == 0 and seen["requests"] >= 3, seen


async def _recording_server(aiohttp_server: Any, seen: list[dict[str, str]]) -> str:
    """Answers every read as Exchange would, records each request's headers, and sets a routing cookie."""
    async def handle(request: web.Request) -> web.Response:
        data = await request.read()
        seen.append(dict(request.headers))
        op = next((o for o in ("GetFolder", "SyncFolderItems", "FindItem", "GetItem") if f"<m:{o}".encode() in data),
                  "?")
        status, body, ctype = ordinary(op)
        resp = web.Response(status=status, body=body, content_type=ctype)
        resp.set_cookie("X-BackEndCookie", f"route-{len(seen)}", path="/")
        return resp
    app = web.Application()
    app.router.add_post(ENDPOINT, handle)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}{ENDPOINT}"


async def test_a_read_sends_the_headers_requests_would_and_keeps_the_cookies_both_ways(
        aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    straight: list[dict[str, str]] = []
    url = await _recording_server(aiohttp_server, straight)
    seen = _spy(monkeypatch)
    src = make_source(url, max_workers=1)
    try:
        await src.read_window(ROOM1, window())  # (the server asks for no authentication)
        await src.read_window(ROOM1, window())
        # The first read opened the connection, requests' way; every read after it went straight on it.
        assert seen == {"pool": len(straight) - 1, "requests": 1}
        monkeypatch.setattr(transport, "post", lambda *args, **kwargs: None)
        through_requests: list[dict[str, str]] = []
        url2 = await _recording_server(aiohttp_server, through_requests)
        src2 = make_source(url2, max_workers=1)
        try:
            await src2.read_window(ROOM1, window())
            await src2.read_window(ROOM1, window())
        finally:
            await src2.close()
    finally:
        await src.close()
    assert len(straight) == len(through_requests) >= 4

    def comparable(h: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in h.items() if k.lower() not in ("host", "cookie", "content-length")}
    assert [comparable(h) for h in straight] == [comparable(h) for h in through_requests]
    assert straight[0]["X-AnchorMailbox"] == "room1@contoso.com" and straight[0]["Connection"] == "Keep-Alive"
    # Straight or requests' way, the same Host and the headers in the same order.
    assert {h["Host"] for h in straight} == {url.split("/")[2]}
    assert len({tuple(k for k in h if k != "Cookie") for h in straight + through_requests}) == 1
    # Each answer's cookie went back with the next request, as requests' cookie jar sends it.
    assert "Cookie" not in straight[0]
    assert [h.get("Cookie") for h in straight[1:]] == [f"X-BackEndCookie=route-{i}" for i in range(1, len(straight))]
    assert [h.get("Cookie") for h in straight] == [h.get("Cookie") for h in through_requests]


async def test_answers_in_chunks_and_gzip_as_iis_sends_them_are_read_straight(
        aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exchange behind IIS answers in chunks, compressed when asked (the sessions accept gzip and deflate).
    async def handle(request: web.Request) -> web.Response:
        data = await request.read()
        op = next((o for o in ("GetFolder", "SyncFolderItems", "FindItem", "GetItem") if f"<m:{o}".encode() in data),
                  "?")
        status, body, ctype = ordinary(op)
        resp = web.Response(status=status, body=body, content_type=ctype)
        resp.enable_chunked_encoding()
        resp.enable_compression(web.ContentCoding.gzip)
        return resp
    app = web.Application()
    app.router.add_post(ENDPOINT, handle)
    server = await aiohttp_server(app)
    seen = _spy(monkeypatch)
    src = make_source(f"http://127.0.0.1:{server.port}{ENDPOINT}", max_workers=1)
    try:
        first = await src.read_window(ROOM1, window())
        again = await src.read_window(ROOM1, window())
    finally:
        await src.close()
    assert [b.subject for b in first] == [b.subject for b in again] and first
    assert seen["requests"] == 1 and seen["pool"] >= 3, seen


async def test_a_subscribe_straight_on_the_pool_keeps_the_affinity_cookie_its_answer_set(
        ews: SimFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch)
    src = make_source(ews.url, max_workers=1)
    try:
        await src.verify(ROOM1)  # (opens and authenticates the connection, requests' way)
        sid = await asyncio.to_thread(lambda: _guarded_subscribe(src, ROOM1))
        cookie = src.account(ROOM1).affinity_cookie
    finally:
        await src.close()
    backend = ews.call(lambda: ews.sim.directory.get(ROOM1).backend)
    assert sid and cookie == affinity_cookie(ews.sim, backend)
    assert seen == {"requests": 1, "pool": 1}, seen  # the verification's, then the Subscribe straight


def _guarded_subscribe(src: EwsSource, room: str) -> str | None:
    with src.guarded(room):
        return src.subscribe_streaming(room)


async def _verified_source(aiohttp_server: Any, rest: Callable[[web.Request], Awaitable[web.StreamResponse]],
                           **settings: Any) -> tuple[EwsSource, list[web.Request]]:
    """A source verified against a server that answers its GetFolder whole (which opens the connection, requests'
    way) and every other request with ``rest``; the list of those other requests."""
    others: list[web.Request] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if b"<m:GetFolder" in await request.read():
            status, body, ctype = ordinary("GetFolder")
            return web.Response(status=status, body=body, content_type=ctype)
        others.append(request)
        return await rest(request)
    app = web.Application()
    app.router.add_post(ENDPOINT, handle)
    server = await aiohttp_server(app)
    src = make_source(f"http://127.0.0.1:{server.port}{ENDPOINT}", max_workers=1, **settings)
    await src.verify(ROOM1)
    return src, others


def _cut_off(opening: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An answer that announces 100,000 bytes, sends 200 and closes the connection."""
    async def rest(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/xml", "Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(envelope(opening)[:200])
        assert request.transport is not None
        request.transport.close()
        return resp
    return rest


async def test_a_subscribe_whose_answer_breaks_off_is_not_sent_again(aiohttp_server: Any) -> None:
    # Sent again, it could subscribe twice: the broken answer is the error, as exchangelib names it.
    src, subscribes = await _verified_source(aiohttp_server, _cut_off("<m:SubscribeResponse>"))
    try:
        with pytest.raises(GatewayError) as caught:
            await asyncio.to_thread(lambda: _guarded_subscribe(src, ROOM1))
    finally:
        await src.close()
    assert len(subscribes) == 1
    assert "broke while Exchange answered for room1@contoso.com" in str(caught.value), caught.value


async def test_an_answer_cut_off_midway_fails_as_requests_way_fails(aiohttp_server: Any) -> None:
    """Straight on the pool, the cut answer is sent again requests' way (a read changes nothing), which fails as it
    always did: the same error, from one more request."""
    src, requests_seen = await _verified_source(aiohttp_server, _cut_off("<m:FindItemResponse>"))
    try:
        with pytest.raises(GatewayError) as caught:
            await src.read_window(ROOM1, window())
    finally:
        await src.close()
    assert caught.value.key == "exchange_error"
    assert "broke while Exchange answered for room1@contoso.com" in str(caught.value)
    assert len(requests_seen) == 2


async def test_an_answer_that_never_comes_is_waited_for_once(aiohttp_server: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=503)
    seen = _spy(monkeypatch)
    src, requests_seen = await _verified_source(aiohttp_server, never, timeout=1)
    try:
        with pytest.raises(GatewayError) as caught:
            await src.read_window(ROOM1, window())
    finally:
        release.set()
        await src.close()
    assert seen["requests"] == 1  # (the verification's: the read that timed out went straight on the pool)
    assert "Read timed out" in str(caught.value), caught.value
    assert len(requests_seen) == 1  # a timeout is not sent again: it would take as long
