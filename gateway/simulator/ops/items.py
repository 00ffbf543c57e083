"""Item operations: FindItem (CalendarView, paging, restrictions), GetItem, CreateItem (calendar items and
meeting responses), UpdateItem and DeleteItem."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from lxml import etree

from gateway.simulator import ids
from gateway.simulator.actions import SEND_VALUES, remove_instance, sends
from gateway.simulator.calendar import CalendarItem, Instance
from gateway.simulator.itemxml import (
    ItemFields,
    Shape,
    View,
    _ext_value,
    check_shape,
    ext_key,
    parse_item,
    render_all,
    render_fast,
)
from gateway.simulator.mailboxes import Folder
from gateway.simulator.mapi import split_writes
from gateway.simulator.messages import MeetingMessage
from gateway.simulator.ops import Context, operation
from gateway.simulator.ops.folders import resolve_folder
from gateway.simulator.restrictions import predicate
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import EwsError, Responses, parse_bool, parse_datetime, sub

MAX_VIEW = timedelta(days=730)  # CalendarView ranges over two years are refused
FIND_COUNT_LIMIT = 1000  # EWSFindCountLimit
# Properties Exchange refuses in FindItem (a client must GetItem them).
FIND_FORBIDDEN = {"item:Body", "item:UniqueBody", "item:Attachments", "item:MimeContent",
                  "calendar:RequiredAttendees", "calendar:OptionalAttendees", "calendar:Resources",
                  "calendar:ConflictingMeetings", "calendar:AdjacentMeetings", "calendar:ModifiedOccurrences",
                  "calendar:DeletedOccurrences"}


def _m(name: str) -> str:
    return f"{{{MNS}}}{name}"


def _t(name: str) -> str:
    return f"{{{TNS}}}{name}"


def _check_access(ctx: Context, item: CalendarItem) -> None:
    if ctx.may_open(item.mailbox):
        return
    raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")


def resolve_item(ctx: Context, el: etree._Element) -> tuple[CalendarItem, datetime | None]:
    """ItemId / OccurrenceItemId / RecurringMasterItemId -> (item, original start of the occurrence or None)."""
    name = etree.QName(el).localname
    d = ctx.directory
    if name in ("ItemId", "ReferenceItemId"):
        value = el.get("Id", "")
        if ids.is_occurrence_id(value):
            _mb_idx, master_iid, index = ids.parse_occurrence_id(value)
            return _occurrence(ctx, master_iid, index)
        _mb_idx, iid = ids.parse_item_id(value)
        item = d.item(iid)
        if item is None:
            raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
        _check_access(ctx, item)
        return item, None
    if name == "OccurrenceItemId":
        master_value = el.get("RecurringMasterId", "")
        _mb_idx, master_iid = ids.parse_item_id(master_value)
        return _occurrence(ctx, master_iid, int(el.get("InstanceIndex", "0")))
    if name == "RecurringMasterItemId":
        value = el.get("OccurrenceId", "")
        if ids.is_occurrence_id(value):
            _mb, master_iid, _ = ids.parse_occurrence_id(value)
        else:
            _mb, master_iid = ids.parse_item_id(value)
        item = d.item(master_iid)
        if item is None:
            raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
        _check_access(ctx, item)
        if item.recurrence is None:
            raise EwsError("ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange",
                           "The item is not part of a recurring series.")
        return item, None
    raise EwsError("ErrorInvalidRequest", f"Unsupported item id element {name}.")


def _occurrence(ctx: Context, master_iid: int, index: int) -> tuple[CalendarItem, datetime]:
    master = ctx.directory.item(master_iid)
    if master is None:
        raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
    _check_access(ctx, master)
    if master.recurrence is None or index < 1:
        raise EwsError("ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange",
                       "Occurrence index is out of recurrence range.")
    original = master.find_instance(index)
    if original is None:
        raise EwsError("ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange",
                       "Occurrence index is out of recurrence range.")
    if master.deleted and original in master.deleted:
        raise EwsError("ErrorCalendarOccurrenceIsDeletedFromRecurrence",
                       "Occurrence with this index was previously deleted from the recurrence.")
    return master, original


def _view(ctx: Context, item: CalendarItem, original: datetime | None) -> View:
    inst = Instance(item, item.index_of(original) or 0, original) if original is not None else None
    return View(item, inst, ctx.directory)


# -- GetItem ---------------------------------------------------------------------------------------------
@operation("GetItem")
async def get_item(ctx: Context, body: etree._Element) -> etree._Element:
    shape = Shape.parse(body.find(_m("ItemShape")))
    check_shape(shape)
    out = Responses("GetItem", error_container="m:Items")
    item_ids = body.find(_m("ItemIds"))
    assert item_ids is not None
    for el in item_ids:
        try:
            item, original = resolve_item(ctx, el)
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        render_fast(sub(msg, "m:Items"), _view(ctx, item, original), shape)
    return out.root


# -- FindItem --------------------------------------------------------------------------------------------
@operation("FindItem")
async def find_item(ctx: Context, body: etree._Element) -> etree._Element:
    shape = Shape.parse(body.find(_m("ItemShape")))
    out = Responses("FindItem")
    forbidden = [u for u in shape.uris if u in FIND_FORBIDDEN]
    cal_view = body.find(_m("CalendarView"))
    page = body.find(_m("IndexedPageItemView"))
    restriction = body.find(_m("Restriction"))
    parents = body.find(_m("ParentFolderIds"))
    assert parents is not None
    for fel in parents:
        try:
            if forbidden:
                raise EwsError("ErrorInvalidPropertyRequest",
                               f"The property {forbidden[0]} can't be used in FindItem requests.")
            folder = resolve_folder(ctx, fel)
            if cal_view is not None:
                if restriction is not None:
                    raise EwsError("ErrorInvalidRestriction", "Restrictions can't be used with a calendar view.")
                views, total, last = _calendar_view(ctx, folder, cal_view)
            else:
                views, total, last, offset = _indexed(ctx, folder, page, restriction, body.find(_m("SortOrder")))
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        attrs: dict[str, Any] = {"TotalItemsInView": total, "IncludesLastItemInRange": last}
        if cal_view is None:
            attrs = {"IndexedPagingOffset": offset + len(views), **attrs}
        root = sub(msg, "m:RootFolder", **attrs)
        render_all(sub(root, "t:Items"), views, shape)
    return out.root


def _calendar_view(ctx: Context, folder: Folder, el: etree._Element) -> tuple[list[View], int, bool]:
    start = parse_datetime(el.get("StartDate", ""))
    end = parse_datetime(el.get("EndDate", ""))
    if end < start:
        raise EwsError("ErrorCalendarEndDateIsEarlierThanStartDate", "EndDate is earlier than StartDate.")
    if end - start > MAX_VIEW:
        raise EwsError("ErrorCalendarViewRangeTooBig", "The time period of the calendar view is too large.")
    if folder.folder_class != "IPF.Appointment":
        raise EwsError("ErrorCalendarFolderIsInvalidForCalendarView", "CalendarView is only valid for calendars.")
    limit = min(int(el.get("MaxEntriesReturned", FIND_COUNT_LIMIT)), FIND_COUNT_LIMIT)
    instances: list[Instance] = []
    for item in folder.items.values():
        if item.recurrence is None:  # most items: no generator to start and finish
            if item.overlaps(start, end):
                instances.append(Instance(item, 0, None))
        else:
            instances.extend(item.instances(start, end))
    if ctx.sim.faults.unexpanded_series:  # a server without calendar logic: each series once, as its master
        masters = {i.item.iid: Instance(i.item, 0, None) for i in instances if i.original_start is not None}
        instances = [i for i in instances if i.original_start is None] + list(masters.values())
    instances.sort(key=lambda i: (i.start, i.item.iid))
    shown = instances[:limit]
    return [View(i.item, i, ctx.directory) for i in shown], len(instances), len(shown) == len(instances)


def _indexed(ctx: Context, folder: Folder, page: etree._Element | None, restriction: etree._Element | None,
             sort: etree._Element | None) -> tuple[list[View], int, bool, int]:
    items = list(folder.items.values())
    if restriction is not None and len(restriction):
        pred = predicate(restriction[0], lambda el: _operand(ctx, el))
        items = [i for i in items if pred(i)]
    if sort is not None:
        for order in reversed(list(sort)):
            uri = order.find(_t("FieldURI"))
            if uri is None:
                continue
            getter = _getter(uri.get("FieldURI", ""))
            items.sort(key=lambda i, g=getter: (g(i) is None, g(i) or ""),  # type: ignore[misc]
                       reverse=order.get("Order") == "Descending")
    else:
        items.sort(key=lambda i: i.iid)
    offset = int(page.get("Offset", "0")) if page is not None else 0
    limit = min(int(page.get("MaxEntriesReturned", FIND_COUNT_LIMIT)) if page is not None and
                page.get("MaxEntriesReturned") else FIND_COUNT_LIMIT, FIND_COUNT_LIMIT)
    if page is not None and page.get("BasePoint") == "End":
        items.reverse()
    shown = items[offset:offset + limit]
    return ([View(i, None, ctx.directory) for i in shown], len(items), offset + len(shown) >= len(items), offset)


_GETTERS: dict[str, Callable[[CalendarItem], Any]] = {
    "item:Subject": lambda i: i.subject,
    "item:ItemClass": lambda i: i.item_class,
    "item:DateTimeCreated": lambda i: i.created,
    "item:LastModifiedTime": lambda i: i.modified,
    "item:Sensitivity": lambda i: i.sensitivity,
    "calendar:Start": lambda i: i.start,
    "calendar:End": lambda i: i.end,
    "calendar:UID": lambda i: i.uid,
    "calendar:IsRecurring": lambda i: i.recurrence is not None,
    "calendar:CalendarItemType": lambda i: i.item_type,
    "calendar:IsCancelled": lambda i: i.is_cancelled,
    "calendar:IsMeeting": lambda i: i.is_meeting,
    "calendar:Location": lambda i: i.location,
    "calendar:LegacyFreeBusyStatus": lambda i: i.free_busy,
    "item:DateTimeReceived": lambda i: i.created,
    "message:IsRead": lambda i: i.is_read if isinstance(i, MeetingMessage) else None,
    "meeting:ResponseType": lambda i: i.response_type if isinstance(i, MeetingMessage) else None,
}


def _getter(uri: str) -> Callable[[CalendarItem], Any]:
    try:
        return _GETTERS[uri]
    except KeyError:
        raise EwsError("ErrorUnsupportedPathForQuery", f"The property {uri} is not supported in restrictions.") \
            from None


def _operand(ctx: Context, el: etree._Element) -> Callable[[CalendarItem], Any]:
    uri = el.find(_t("FieldURI"))
    if uri is not None:
        return _getter(uri.get("FieldURI", ""))
    ext = el.find(_t("ExtendedFieldURI"))
    if ext is not None:
        key = ext_key(ext)
        return lambda i: _ext_value(View(i, None, ctx.directory), key)
    raise EwsError("ErrorUnsupportedPathForQuery", "Unsupported property in restriction.")


# -- CreateItem ------------------------------------------------------------------------------------------
@operation("CreateItem")
async def create_item(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("CreateItem", error_container="m:Items")
    items = body.find(_m("Items"))
    assert items is not None
    send = body.get("SendMeetingInvitations")
    disposition = body.get("MessageDisposition")
    saved = body.find(_m("SavedItemFolderId"))
    for el in items:
        try:
            result = _create_one(ctx, el, send, disposition, saved)
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        container = sub(msg, "m:Items")
        if result is not None:
            ci = sub(container, "t:CalendarItem")
            sub(ci, "t:ItemId", Id=ids.item_id(result.mailbox.idx, result.iid),
                ChangeKey=ids.change_key(result.iid, result.version))
    return out.root


def _create_one(ctx: Context, el: etree._Element, send: str | None, disposition: str | None,
                saved: etree._Element | None) -> CalendarItem | None:
    name = etree.QName(el).localname
    cal = ctx.sim.calendars
    if name == "CalendarItem":
        if send is None:
            raise EwsError("ErrorSendMeetingInvitationsRequired",
                           "SendMeetingInvitations attribute is required for calendar items.")
        folder = resolve_folder(ctx, saved[0]) if saved is not None and len(saved) else ctx.mailbox.calendar
        if folder.folder_class != "IPF.Appointment":
            raise EwsError("ErrorCannotCreateCalendarItemInNonCalendarFolder",
                           "Calendar items can only be created in a calendar folder.")
        fields: ItemFields = parse_item(el, ctx.directory, ctx.tz_context)
        mapped, ext = split_writes(fields.ext, strict=False)
        created = cal.create(folder.mailbox, {**mapped, **fields.values}, ext, send, folder)
        if fields.mime is not None and created.recurrence is not None:
            for start in fields.mime.deleted:  # EXDATE
                if created.index_of(start) is not None:
                    remove_instance(created, start)
            for start, values in fields.mime.exceptions:  # VEVENTs with a RECURRENCE-ID
                if created.index_of(start) is not None:
                    cal.modify_instance(created, start, values)
        return created
    ref = el.find(_t("ReferenceItemId"))
    if ref is None:
        raise EwsError("ErrorInvalidRequest", f"{name} needs a ReferenceItemId.")
    item, original = resolve_item(ctx, ref)
    if isinstance(item, MeetingMessage):
        raise EwsError(_NOT_FOR_MESSAGES.get(name, "ErrorInvalidReferenceItem"),
                       f"{name} cannot refer to a meeting response.")
    notify = disposition != "SaveOnly"
    if name in ("AcceptItem", "TentativelyAcceptItem", "DeclineItem"):
        response = {"AcceptItem": "Accept", "TentativelyAcceptItem": "Tentative", "DeclineItem": "Decline"}[name]
        _check_change_key(ref, item)
        body_el = el.find(_t("Body"))
        cal.respond(item, response, original, send=notify,
                    body=body_el.text or "" if body_el is not None else None,
                    body_type=body_el.get("BodyType", "Text") if body_el is not None else "Text",
                    save_copy=disposition == "SendAndSaveCopy")
        return None
    if name == "CancelCalendarItem":
        if original is not None:
            cal.delete_occurrence(item, original)
        else:
            cal.cancel(item, send=True)
        return None
    if name == "RemoveItem":
        if not item.is_cancelled:
            raise EwsError("ErrorInvalidOperation",
                           "Only a cancelled meeting can be removed.")
        ctx.directory.remove_item(item, "MoveToDeletedItems")
        return None
    raise EwsError("ErrorInvalidItemForOperationCreateItem", f"The simulator cannot create a {name}.")


_NOT_FOR_MESSAGES = {"AcceptItem": "ErrorInvalidItemForOperationAcceptItem",
                     "TentativelyAcceptItem": "ErrorInvalidItemForOperationTentative",
                     "DeclineItem": "ErrorInvalidItemForOperationDeclineItem",
                     "CancelCalendarItem": "ErrorInvalidItemForOperationCancelItem",
                     "RemoveItem": "ErrorInvalidItemForOperationRemoveItem"}


def _check_change_key(ref: etree._Element, item: CalendarItem) -> None:
    ck = ref.get("ChangeKey")
    if ck and ids.parse_change_key(ck) not in (None, (item.iid, item.version)):
        parsed = ids.parse_change_key(ck)
        if parsed is not None and parsed[0] == item.iid and parsed[1] < item.version:
            raise EwsError("ErrorIrresolvableConflict",
                           "The send or update operation could not be performed because the change key passed in "
                           "the request does not match the current change key for the item.")


# -- UpdateItem ------------------------------------------------------------------------------------------
_SETTABLE = {
    "item:Subject": "subject", "item:Body": "body", "item:Sensitivity": "sensitivity",
    "item:Importance": "importance", "item:Categories": "categories",
    "item:ReminderIsSet": "reminder_set", "item:ReminderMinutesBeforeStart": "reminder",
    "calendar:Start": "start", "calendar:End": "end", "calendar:IsAllDayEvent": "all_day",
    "calendar:LegacyFreeBusyStatus": "free_busy", "calendar:Location": "location",
    "calendar:RequiredAttendees": "required", "calendar:OptionalAttendees": "optional",
    "calendar:Resources": "resources", "calendar:Recurrence": "recurrence",
    "calendar:StartTimeZone": "tz", "calendar:EndTimeZone": "end_tz", "calendar:MeetingTimeZone": "tz",
    "calendar:IsResponseRequested": "response_requested", "calendar:NetShowUrl": "online_url",
    "calendar:UID": "uid",
}
_EMPTY: dict[str, Any] = {"subject": "", "body": None, "location": None, "categories": (), "required": (),
                          "optional": (), "resources": (), "recurrence": None, "online_url": None,
                          "reminder_set": False}


@operation("UpdateItem")
async def update_item(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("UpdateItem", error_container="m:Items")
    conflict = body.get("ConflictResolution", "AutoResolve")
    send = body.get("SendMeetingInvitationsOrCancellations")
    changes = body.find(_m("ItemChanges"))
    assert changes is not None
    for change in changes:
        try:
            item, original = _update_one(ctx, change, conflict, send)
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        items = sub(msg, "m:Items")
        ci = sub(items, "t:MeetingResponse" if isinstance(item, MeetingMessage) else "t:CalendarItem")
        if original is not None:
            sub(ci, "t:ItemId", Id=ids.occurrence_id(item.mailbox.idx, item.iid, item.index_of(original) or 0),
                ChangeKey=ids.change_key(item.iid, item.version))
        else:
            sub(ci, "t:ItemId", Id=ids.item_id(item.mailbox.idx, item.iid),
                ChangeKey=ids.change_key(item.iid, item.version))
        sub(msg, "m:ConflictResults").append(_count(0))
    return out.root


def _count(n: int) -> etree._Element:
    el = etree.Element(_t("Count"))
    el.text = str(n)
    return el


def _update_one(ctx: Context, change: etree._Element, conflict: str, send: str | None
                ) -> tuple[CalendarItem, datetime | None]:
    id_el = change[0]
    item, original = resolve_item(ctx, id_el)
    ck = id_el.get("ChangeKey")
    if ck and conflict == "NeverOverwrite":
        parsed = ids.parse_change_key(ck)
        if parsed is not None and parsed != (item.iid, item.version):
            raise EwsError("ErrorIrresolvableConflict",
                           "The send or update operation could not be performed because the change key passed in "
                           "the request does not match the current change key for the item.")
    if send is not None and send not in SEND_VALUES:
        raise EwsError("ErrorInvalidRequest", f"Invalid SendMeetingInvitationsOrCancellations {send}.")
    if item.is_meeting and item.my_response == "Organizer" and send is None:
        raise EwsError("ErrorInvalidRequest",
                       "SendMeetingInvitationsOrCancellations is required for meetings.")
    if isinstance(item, MeetingMessage):
        _update_message(ctx, item, change)
        return item, None
    values: dict[str, Any] = {}
    ext: dict[Any, Any] = {}
    updates = change.find(_t("Updates"))
    for upd in updates if updates is not None else []:
        kind = etree.QName(upd).localname
        path = upd[0]
        pname = etree.QName(path).localname
        if pname == "ExtendedFieldURI":
            key = ext_key(path)
            if kind == "DeleteItemField":
                ext[key] = None
            else:
                ext.update(parse_item(_carrier(upd), ctx.directory, ctx.tz_context).ext)
            continue
        uri = path.get("FieldURI", "")
        attr = _SETTABLE.get(uri)
        if attr is None:
            raise EwsError("ErrorInvalidPropertySet", f"The property {uri} cannot be set.")
        if kind == "DeleteItemField":
            values[attr] = _EMPTY.get(attr)
            continue
        carrier = _carrier(upd)
        fields = parse_item(carrier, ctx.directory, ctx.tz_context)
        if attr not in fields.values:
            raise EwsError("ErrorIncorrectUpdatePropertyCount",
                           f"Each update must carry exactly one property ({uri}: {etree.tostring(carrier)!r}).")
        value = fields.values[attr]
        if kind == "AppendToItemField" and attr in ("required", "optional", "resources"):
            value = tuple(getattr(item, attr)) + value
        values[attr] = value
    if ext:
        mapped, ext = split_writes(ext, strict=True)  # PR_SUBJECT by tag is the subject
        values = {**mapped, **values}
    values.pop("end_tz", None)
    if original is not None:
        values.pop("tz", None)
    if "uid" in values:
        raise EwsError("ErrorInvalidPropertySet", "The UID of an existing item cannot be changed.")
    if "reminder_set" in values and values.pop("reminder_set") is False:
        values["reminder"] = None
    cal = ctx.sim.calendars
    if original is not None:
        unsupported = set(values) - {"start", "end", "subject", "location", "body", "free_busy"}
        if unsupported:
            raise EwsError("ErrorInvalidPropertySet", f"{sorted(unsupported)[0]} cannot be set on an occurrence.")
        cal.update_occurrence(item, original, values, send or "SendToNone")
    else:
        cal.update(item, values, send or "SendToNone")
    if ext:
        item.ext = {**(item.ext or {}), **ext}
        item.ext = {k: v for k, v in item.ext.items() if v is not None} or None
        if not values:
            ctx.directory.touch(item, free_busy=False)
    return item, original


def _carrier(update: etree._Element) -> etree._Element:
    """The item element of a SetItemField/AppendToItemField: any item type (t:Item, t:CalendarItem, ...), holding
    exactly the one property the path names."""
    carrier = update[1] if len(update) > 1 else None
    if carrier is None or len(carrier) != 1:
        raise EwsError("ErrorIncorrectUpdatePropertyCount", "Each update must carry exactly one property.")
    return carrier


def _update_message(ctx: Context, item: MeetingMessage, change: etree._Element) -> None:
    """What a client changes on a received meeting response: its read flag and extended properties."""
    updates = change.find(_t("Updates"))
    ext: dict[Any, Any] = {}
    for upd in updates if updates is not None else []:
        kind = etree.QName(upd).localname
        path = upd[0]
        carrier = next((c for c in upd[1:]), None)
        if etree.QName(path).localname == "ExtendedFieldURI":
            if kind == "DeleteItemField":
                ext[ext_key(path)] = None
            elif carrier is not None:
                ext.update(parse_item(carrier, ctx.directory, ctx.tz_context).ext)
            continue
        uri = path.get("FieldURI", "")
        if uri != "message:IsRead":
            raise EwsError("ErrorInvalidPropertySet", f"The property {uri} cannot be set on a meeting response.")
        item.is_read = kind != "DeleteItemField" and carrier is not None and \
            parse_bool(carrier.findtext(_t("IsRead")))
    if ext:
        merged = {**(item.ext or {}), **ext}
        item.ext = {k: v for k, v in merged.items() if v is not None} or None
    ctx.directory.touch(item, free_busy=False)


# -- DeleteItem ------------------------------------------------------------------------------------------
@operation("DeleteItem")
async def delete_item(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("DeleteItem")
    delete_type = body.get("DeleteType", "HardDelete")
    send = body.get("SendMeetingCancellations")
    item_ids = body.find(_m("ItemIds"))
    assert item_ids is not None
    cal = ctx.sim.calendars
    for el in item_ids:
        try:
            item, original = resolve_item(ctx, el)
            if original is not None:
                cal.delete_occurrence(item, original, send or "SendToNone")
            elif item.is_meeting and item.my_response == "Organizer" and sends(send):
                cal.cancel(item, send=True, delete_type=delete_type)
            else:
                ctx.directory.remove_item(item, delete_type)
        except EwsError as e:
            out.error(e)
            continue
        out.success()
    return out.root
