"""Every operation the simulator implements, driven by a real client, with every request it received and every
response it wrote re-validated here against Microsoft's schema, independently of the simulator's own checks.

The one documented wire/schema difference (m:Notification and m:SubscriptionId inside GetStreamingEvents
responses, where the schema says t:) is renamed before validating, as in ews_schema/README.md.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import requests
from exchangelib import CalendarItem, EWSDateTime, Folder
from exchangelib.errors import ErrorItemNotFound
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY
from lxml import etree

from gateway.simulator.ops import load_all
from gateway.simulator.schema import MNS, TNS, validate
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from tests.conftest import TZ

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"


def problems_in(envelope: bytes, streaming: bool = False) -> list[str]:
    root = etree.fromstring(envelope)
    if streaming:
        for tag in ("Notification", "SubscriptionId"):
            for el in root.iter(f"{{{MNS}}}{tag}"):
                parent = el.getparent()
                if parent is not None and etree.QName(parent).localname in ("Notifications", "ErrorSubscriptionIds"):
                    el.tag = f"{{{TNS}}}{tag}"
    out = []
    for part in (f"{{{SOAP}}}Header", f"{{{SOAP}}}Body"):
        container = root.find(part)
        for child in container if container is not None else []:
            if etree.QName(child).namespace in (TNS, MNS):
                problem = validate(child)
                if problem:
                    out.append(f"{etree.QName(child).localname}: {problem}")
    return out


def test_every_operation_request_and_response_validates(sim_factory):
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=1.0, keepalive_seconds=0.2))
    recorded: list[tuple[str, bytes, bytes]] = []
    ews.call(lambda: setattr(ews.sim, "recorder", lambda op, req, resp: recorded.append((op, req, resp))))

    # ConvertId (version discovery), GetFolder, FindFolder
    organizer = ews.organizer("alice@contoso.com")
    list(organizer.root.children)
    # CreateFolder, DeleteFolder, GetUserConfiguration (of a configuration no mailbox here has)
    made = Folder(parent=organizer.msg_folder_root, name="Conformance", folder_class="IPF.Note")
    made.save()
    made.delete()
    with pytest.raises(ErrorItemNotFound):
        organizer.calendar.get_user_configuration("WorkHours")
    # CreateItem, GetItem, FindItem, UpdateItem, DeleteItem, and a meeting response (CreateItem AcceptItem)
    start = EWSDateTime.now(TZ).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
    item = CalendarItem(account=organizer, folder=organizer.calendar, subject="Conformance", start=start,
                        end=start + timedelta(hours=1), resources=["room1@contoso.com"],
                        required_attendees=["bob@contoso.com"])
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    bob = ews.organizer("bob@contoso.com")
    copy = next(i for i in bob.calendar.view(start=start - timedelta(hours=1), end=start + timedelta(hours=2)))
    copy.refresh()
    copy.accept()
    item.refresh()
    item.subject = "Conformance, moved"
    item.save(update_fields=["subject"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    # SyncFolderItems, Subscribe (pull and streaming), GetEvents, Unsubscribe
    room = ews.room("room1@contoso.com")
    list(room.calendar.sync_items())
    pull_id, watermark = room.calendar.subscribe_to_pull()
    list(room.calendar.get_events(pull_id, watermark))
    room.calendar.unsubscribe(pull_id)
    stream_id = room.calendar.subscribe_to_streaming()
    # GetUserAvailability (and the GetServerTimeZones exchangelib sends first), GetRoomLists, GetRooms, ResolveNames
    busy = list(organizer.protocol.get_free_busy_info(accounts=[("room1@contoso.com", "Required", False)],
                                                      start=start, end=start + timedelta(days=1)))
    assert busy and busy[0].calendar_events
    lists = list(organizer.protocol.get_roomlists())
    list(organizer.protocol.get_rooms(lists[0].email_address))
    organizer.protocol.version  # exchangelib needs it before ResolveNames
    organizer.protocol.resolve_names(["carol"])
    item.refresh()
    item.delete(send_meeting_cancellations=SEND_TO_ALL_AND_SAVE_COPY)

    # GetStreamingEvents is a stream: read it raw, with Basic auth, and validate every envelope in it.
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" xmlns:t="{TNS}">'
        '<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
        '<t:PrimarySmtpAddress>room1@contoso.com</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>'
        f'</s:Header><s:Body><m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{stream_id}'
        '</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout>'
        '</m:GetStreamingEvents></s:Body></s:Envelope>').encode()
    resp = requests.post(ews.url, data=body, auth=(f"CONTOSO\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD), timeout=30,
                         headers={"Content-Type": "text/xml; charset=utf-8"}, stream=True)
    raw = resp.content  # the stream closes itself after one (simulated) minute
    documents = re.findall(rb"<s:Envelope.*?</s:Envelope>", raw, re.DOTALL)
    assert len(documents) >= 2, raw[:500]
    recorded += [("GetStreamingEvents", body, doc) for doc in documents]
    room.calendar.unsubscribe(stream_id)

    missing = set(load_all()) - {op for op, _, _ in recorded}
    assert not missing, f"operations never exercised: {sorted(missing)}"
    failures = []
    for op, request, response in recorded:
        failures += [f"{op} request: {p}" for p in problems_in(request)]
        failures += [f"{op} response: {p}" for p in problems_in(response, streaming=op == "GetStreamingEvents")]
    assert not failures, failures[:10]
