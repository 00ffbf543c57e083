"""Subscribe, Unsubscribe, GetEvents (pull) and GetStreamingEvents (streaming), with backend affinity.

Routing (see notifications.route): a request lands on the backend named by its X-BackEndOverrideCookie (header, as
exchangelib sends it, or Cookie), else on its X-AnchorMailbox's backend, else on the impersonated mailbox's. A
subscription is only known on the backend that created it. Subscribe with X-PreferServerAffinity: true answers
with Set-Cookie: X-BackEndOverrideCookie=<that backend>.
"""

from __future__ import annotations

from aiohttp import web
from lxml import etree

from gateway.simulator.notifications import (
    AFFINITY_COOKIE,
    EVENT_TYPES,
    MAX_IDS_PER_STREAM,
    affinity_cookie,
    encode_watermark,
    prefers_affinity,
    render_event,
    route,
    streaming_envelope,
)
from gateway.simulator.ops import RESPONSE_CODE, Context, operation
from gateway.simulator.ops.folders import resolve_folder
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import EwsError, Responses, parse_bool, sub


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _subscription_folders(ctx: Context, req: etree._Element) -> frozenset[int] | None:
    if parse_bool(req.get("SubscribeToAllFolders")):
        return None
    ids_el = req.find(f"{{{TNS}}}FolderIds")
    if ids_el is None or len(ids_el) == 0:
        raise EwsError("ErrorInvalidSubscriptionRequest",
                       "The subscription request names no folders and does not subscribe to all folders.")
    folders = [resolve_folder(ctx, el) for el in ids_el]
    mailboxes = {f.mailbox.idx for f in folders}
    if len(mailboxes) > 1:
        raise EwsError("ErrorInvalidSubscriptionRequest",
                       "A subscription can include folders from only one mailbox.")
    if folders[0].mailbox is not ctx.mailbox:
        raise EwsError("ErrorSubscriptionDelegateAccessNotSupported",
                       "Subscriptions are not supported for delegate user access; use impersonation.")
    return frozenset(f.no for f in folders)


@operation("Subscribe")
async def subscribe(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("Subscribe")
    req = body[0]
    kind = _local(req)
    hub = ctx.sim.notifications
    backend = route(ctx)
    try:
        if kind == "PushSubscriptionRequest":
            raise EwsError("ErrorInvalidSubscriptionRequest",
                           "The simulator does not implement push subscriptions; use a streaming or pull "
                           "subscription.")
        folders = _subscription_folders(ctx, req)
        event_types = [(el.text or "").strip() for el in req.iterfind(f"{{{TNS}}}EventTypes/{{{TNS}}}EventType")]
        unknown = [e for e in event_types if e not in EVENT_TYPES]
        if unknown:
            raise EwsError("ErrorInvalidRequest", f"Unknown event types {unknown}.")
        if kind == "PullSubscriptionRequest":
            timeout = int((req.findtext(f"{{{TNS}}}Timeout") or "0").strip())
            watermark = req.findtext(f"{{{TNS}}}Watermark")
            s = hub.subscribe("pull", ctx.mailbox, ctx.principal, backend, folders, event_types, timeout=timeout,
                              watermark=watermark.strip() if watermark else None)
        else:
            s = hub.subscribe("streaming", ctx.mailbox, ctx.principal, backend, folders, event_types)
    except EwsError as e:
        if e.fault:
            raise
        out.error(e)
        return out.root
    msg = out.success()
    sub(msg, "m:SubscriptionId", s.id)
    if s.kind == "pull":
        sub(msg, "m:Watermark", encode_watermark(s.mailbox.idx, s.counter))
    if prefers_affinity(ctx):
        ctx.cookies[AFFINITY_COOKIE] = affinity_cookie(ctx.sim, backend)
    return out.root


@operation("Unsubscribe")
async def unsubscribe(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("Unsubscribe")
    sid = (body.findtext(f"{{{MNS}}}SubscriptionId") or "").strip()
    hub = ctx.sim.notifications
    try:
        s = hub.find(sid, route(ctx), ctx.principal)
    except EwsError as e:
        out.error(e)
        return out.root
    hub.unsubscribe(s)
    out.success()
    return out.root


@operation("GetEvents")
async def get_events(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("GetEvents")
    sid = (body.findtext(f"{{{MNS}}}SubscriptionId") or "").strip()
    watermark = (body.findtext(f"{{{MNS}}}Watermark") or "").strip()
    hub = ctx.sim.notifications
    try:
        s = hub.find(sid, route(ctx), ctx.principal)
        if s.kind != "pull":
            raise EwsError("ErrorInvalidPullSubscriptionId", "The subscription is not a pull subscription.")
        previous, events, more = hub.get_events(s, watermark)
    except EwsError as e:
        out.error(e)
        return out.root
    msg = out.success()
    note = sub(msg, "m:Notification")
    sub(note, "t:SubscriptionId", s.id)
    sub(note, "t:PreviousWatermark", previous)
    sub(note, "t:MoreEvents", more)
    for ev in events or [hub.status_event(s)]:
        render_event(note, ev, watermark=True)
    return out.root


def _stream_error(ctx: Context, err: EwsError, error_ids: list[str] | None = None) -> web.Response:
    resp = web.Response(body=streaming_envelope(ctx.sim, error=err, error_ids=error_ids, status="Closed"),
                        content_type="text/xml", charset="utf-8")
    resp[RESPONSE_CODE] = err.code
    return resp


@operation("GetStreamingEvents")
async def get_streaming_events(ctx: Context, body: etree._Element) -> web.StreamResponse:
    hub = ctx.sim.notifications
    ids_el = body.find(f"{{{MNS}}}SubscriptionIds")
    requested: list[str] = []
    for el in ids_el if ids_el is not None else []:
        sid = (el.text or "").strip()
        if sid and sid not in requested:
            requested.append(sid)
    timeout = int((body.findtext(f"{{{MNS}}}ConnectionTimeout") or "0").strip())
    if len(requested) > MAX_IDS_PER_STREAM:
        return _stream_error(ctx, EwsError(
            "ErrorInvalidRequest", f"A GetStreamingEvents request can name at most {MAX_IDS_PER_STREAM} "
                                   f"subscriptions; this one names {len(requested)}."))
    backend = route(ctx)
    hub.sweep()
    subs = []
    failed: list[tuple[EwsError, str]] = []
    for sid in requested:
        try:
            s = hub.find(sid, backend, ctx.principal)
            if s.kind != "streaming":
                raise EwsError("ErrorInvalidSubscription", "The subscription is not a streaming subscription.")
            subs.append(s)
        except EwsError as e:
            failed.append((e, sid))
    if failed:
        # Exchange fails the whole request and lists the bad ids; the good ones get no notifications either.
        first = failed[0][0]
        return _stream_error(ctx, first, [sid for _, sid in failed])
    try:
        stream = hub.open_stream(ctx, subs, timeout)
    except EwsError as e:
        return _stream_error(ctx, e)
    return await stream.serve()
