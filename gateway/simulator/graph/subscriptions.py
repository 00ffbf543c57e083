"""Change notifications: ``/subscriptions`` with Graph's validation handshake, capped and renewable expiry,
delivery of every change to a subscribed mailbox's events with retries, lifecycle events, and expiry.

- Create: the simulator POSTs ``?validationToken=...`` to the notification URL and to the lifecycle notification
  URL; each must answer 200 ``text/plain`` with the token within ``GraphConfig.validation_timeout`` seconds, or
  the answer is 400 ``ValidationError`` and no subscription exists.
- The granted ``expirationDateTime`` is the requested one, at most ``max_minutes`` ahead (4,230 by default; the
  control API shortens it for tests); an expired subscription is gone, without a word, as in Graph.
- Each created/updated/deleted event in the mailbox's calendar is POSTed (basic notifications: ids only) with
  the subscription's ``clientState``; a non-2xx answer or no answer is retried after ``delivery_backoff``; when
  every attempt failed the notification is dropped and a ``missed`` lifecycle event is sent.
- Lifecycle events (``reauthorizationRequired``, ``subscriptionRemoved``, ``missed``) go to the lifecycle URL when
  the control API fires them. After ``reauthorizationRequired`` delivery pauses until the subscription is
  reauthorized (``POST /subscriptions/{id}/reauthorize``) or renewed, and changes meanwhile are lost, as Graph
  documents (a client runs delta to catch up); ``subscriptionRemoved`` removes the subscription.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from gateway.simulator.calendar import CalendarItem
from gateway.simulator.graph import ids
from gateway.simulator.graph.errors import GraphError, bad_request
from gateway.simulator.graph.router import GraphRequest, GraphResponse

if TYPE_CHECKING:
    from gateway.simulator.graph.service import GraphService
    from gateway.simulator.mailboxes import Folder

log = structlog.get_logger("gateway.simulator.graph")

_RESOURCE = re.compile(r"^/?(?:users/([^/]+)|me)/(?:calendar/)?events$", re.IGNORECASE)
MIN_MINUTES = 45  # Graph raises shorter requests to this (unless the configured maximum is shorter still)
CHANGE_OF = {"CreatedEvent": "created", "ModifiedEvent": "updated", "DeletedEvent": "deleted"}
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")


@dataclass
class Subscription:
    id: str
    resource: str
    mailbox: str
    change_types: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expiration: datetime
    app_id: str
    needs_reauthorization: bool = False
    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0  # notifications given up after every retry
    lost: int = 0  # changes while delivery paused for reauthorization

    def json(self, graph: GraphService) -> dict[str, Any]:
        return {"@odata.context": graph.context("subscriptions/$entity"), "id": self.id,
                "resource": self.resource, "applicationId": self.app_id,
                "changeType": ",".join(sorted(self.change_types)), "clientState": self.client_state,
                "notificationUrl": self.notification_url, "notificationQueryOptions": None,
                "lifecycleNotificationUrl": self.lifecycle_url,
                "expirationDateTime": _stamp(self.expiration), "creatorId": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                                                           self.app_id)),
                "includeResourceData": None, "latestSupportedTlsVersion": "v1_2", "encryptionCertificate": None,
                "encryptionCertificateId": None, "notificationUrlAppId": None}


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond:06d}0Z"


class Subscriptions:
    def __init__(self, graph: GraphService) -> None:
        self.graph = graph
        self.items: dict[str, Subscription] = {}
        self.max_minutes = float(graph.config.subscription_max_minutes)
        self.validations = 0
        self._session: aiohttp.ClientSession | None = None
        self._session_ca: str | None = None
        graph.sim.directory.listeners.append(self._on_change)
        r = graph.router
        r.add("POST", "/subscriptions", self.create)
        r.add("GET", "/subscriptions", self.list_all)
        r.add("GET", "/subscriptions/{subscription}", self.get)
        r.add("PATCH", "/subscriptions/{subscription}", self.renew)
        r.add("DELETE", "/subscriptions/{subscription}", self.delete)
        r.add("POST", "/subscriptions/{subscription}/reauthorize", self.reauthorize)

    # -- HTTP out ------------------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        cafile = self.graph.config.notify_ca_bundle
        if self._session is not None and self._session_ca != cafile:  # verify against the CA the test set now
            self.graph.sim.spawn(self._session.close())
            self._session = None
        if self._session is None or self._session.closed:
            self._session_ca = cafile
            ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _validate(self, url: str) -> None:
        token = secrets.token_urlsafe(32)
        timeout = aiohttp.ClientTimeout(total=self.graph.config.validation_timeout)
        self.validations += 1
        try:
            async with self.session().post(url, params={"validationToken": token}, data=b"", timeout=timeout,
                                           headers={"Content-Type": "text/plain; charset=utf-8"}) as resp:
                text = await resp.text()
                ctype = resp.headers.get("Content-Type", "")
                status = resp.status
        except TimeoutError as e:
            raise GraphError(400, "ValidationError", "Subscription validation request timeout.") from e
        except (aiohttp.ClientError, OSError) as e:
            raise GraphError(400, "ValidationError", f"Subscription validation request failed. Notification "
                                                     f"endpoint must be reachable: {e.__class__.__name__}.") from e
        if status != 200:
            raise GraphError(400, "ValidationError", f"Subscription validation request failed. Notification "
                                                     f"endpoint must respond with 200 OK to validation request "
                                                     f"(got {status}).")
        if not ctype.lower().startswith("text/plain") or text != token:
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Response must "
                                                     "exactly match validationToken query parameter.")

    # -- routes ---------------------------------------------------------------------------------------
    def _grant(self, requested: Any) -> datetime:
        if not isinstance(requested, str):
            raise bad_request("expirationDateTime is required.", "InvalidRequest")
        try:
            when = datetime.fromisoformat(requested.replace("Z", "+00:00"))
        except ValueError as e:
            raise bad_request(f"The expirationDateTime '{requested}' is not a valid date and time.",
                              "InvalidRequest") from e
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        now = datetime.now(UTC)
        if when <= now:
            raise bad_request("Subscription expiration can only be in the future.", "InvalidRequest")
        longest = now + timedelta(minutes=self.max_minutes)
        shortest = now + timedelta(minutes=min(MIN_MINUTES, self.max_minutes))
        return max(min(when, longest), shortest)

    async def create(self, req: GraphRequest) -> GraphResponse:
        body = req.body if isinstance(req.body, dict) else {}
        m = _RESOURCE.match(str(body.get("resource", "")))
        if m is None or m.group(1) is None:
            raise bad_request(f"The resource '{body.get('resource')}' is not supported: subscribe to "
                              "users/{id}/events.", "InvalidRequest")
        mb = self.graph.mailbox(m.group(1))
        change_types = frozenset(c.strip() for c in str(body.get("changeType", "")).split(",") if c.strip())
        if not change_types or not change_types <= {"created", "updated", "deleted"}:
            raise bad_request("changeType must list created, updated and/or deleted.", "InvalidRequest")
        url, lifecycle = body.get("notificationUrl"), body.get("lifecycleNotificationUrl")
        for name, value in (("notificationUrl", url), ("lifecycleNotificationUrl", lifecycle)):
            if value is not None and (not isinstance(value, str) or not value.lower().startswith("https://")):
                raise bad_request(f"Subscription validation request failed. {name} must be an HTTPS URL.",
                                  "ValidationError")
        if url is None:
            raise bad_request("notificationUrl is required.", "InvalidRequest")
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > 128):
            raise bad_request("clientState must be a string of at most 128 characters.", "InvalidRequest")
        expiration = self._grant(body.get("expirationDateTime"))
        for target in dict.fromkeys([url] + ([lifecycle] if lifecycle else [])):
            await self._validate(target)
        sub = Subscription(str(uuid.uuid4()), str(body["resource"]), mb.smtp, change_types, url, lifecycle,
                           client_state, expiration, req.app_id)
        self.items[sub.id] = sub
        self._schedule_expiry(sub)
        log.debug("graph.subscription_created", id=sub.id, mailbox=mb.smtp, expires=_stamp(expiration))
        return GraphResponse(201, sub.json(self.graph))

    def _find(self, req: GraphRequest) -> Subscription:
        sub = self.items.get(req.params["subscription"])
        if sub is None or sub.app_id != req.app_id:
            raise GraphError(404, "ResourceNotFound", "The object was not found.")
        return sub

    async def list_all(self, req: GraphRequest) -> GraphResponse:
        return GraphResponse(200, {"@odata.context": self.graph.context("subscriptions"),
                                   "value": [s.json(self.graph) for s in self.items.values()
                                             if s.app_id == req.app_id]})

    async def get(self, req: GraphRequest) -> GraphResponse:
        return GraphResponse(200, self._find(req).json(self.graph))

    async def renew(self, req: GraphRequest) -> GraphResponse:
        sub = self._find(req)
        body = req.body if isinstance(req.body, dict) else {}
        sub.expiration = self._grant(body.get("expirationDateTime"))
        self._schedule_expiry(sub)
        self._release(sub)  # a renewal reauthorizes, as Graph allows
        return GraphResponse(200, sub.json(self.graph))

    async def delete(self, req: GraphRequest) -> GraphResponse:
        sub = self._find(req)
        del self.items[sub.id]
        return GraphResponse(204)

    async def reauthorize(self, req: GraphRequest) -> GraphResponse:
        self._release(self._find(req))
        return GraphResponse(200)

    # -- expiry, lifecycle ------------------------------------------------------------------------------
    def _schedule_expiry(self, sub: Subscription) -> None:
        delay = (sub.expiration - datetime.now(UTC)).total_seconds()
        expiration = sub.expiration
        asyncio.get_running_loop().call_later(max(0.0, delay), self._expire, sub.id, expiration)

    def _expire(self, sub_id: str, expiration: datetime) -> None:
        sub = self.items.get(sub_id)
        if sub is not None and sub.expiration == expiration:  # not renewed meanwhile
            del self.items[sub_id]
            log.debug("graph.subscription_expired", id=sub_id)

    def expire(self, sub_ids: list[str] | None = None) -> int:
        """End subscriptions now (all, or those named), as their expiry would."""
        gone = [s for s in list(self.items) if sub_ids is None or s in sub_ids]
        for s in gone:
            del self.items[s]
        return len(gone)

    def lifecycle(self, sub_id: str, event: str) -> Subscription:
        sub = self.items.get(sub_id)
        if sub is None:
            raise KeyError(sub_id)
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"lifecycle event {event!r} is not one of {LIFECYCLE_EVENTS}")
        if event == "reauthorizationRequired":
            sub.needs_reauthorization = True
        elif event == "subscriptionRemoved":
            del self.items[sub.id]
        self._send_lifecycle(sub, event)
        return sub

    def _send_lifecycle(self, sub: Subscription, event: str) -> None:
        if sub.lifecycle_url is None:
            return
        payload = {"value": [{"subscriptionId": sub.id, "subscriptionExpirationDateTime": _stamp(sub.expiration),
                              "tenantId": self.graph.config.tenant_id, "clientState": sub.client_state,
                              "lifecycleEvent": event}]}
        self.graph.sim.spawn(self._deliver(sub, sub.lifecycle_url, payload, lifecycle=True))

    def _release(self, sub: Subscription) -> None:
        sub.needs_reauthorization = False

    # -- delivery -----------------------------------------------------------------------------------------
    def _on_change(self, kind: str, folder: Folder, item: CalendarItem | None, iid: int,
                   old_folder: Folder | None, old_iid: int | None) -> None:
        if not self.items:
            return
        if kind == "MovedEvent" and old_folder is not None and old_folder.distinguished == "calendar":
            change, folder, iid = "deleted", old_folder, old_iid or iid  # into Deleted Items: gone from the calendar
        elif kind in CHANGE_OF and folder.distinguished == "calendar":
            change = CHANGE_OF[kind]
        else:
            return
        mb = folder.mailbox
        for sub in [s for s in self.items.values() if s.mailbox == mb.smtp]:
            if change not in sub.change_types:
                continue
            event_id = ids.event_id(mb.idx, iid)
            resource = f"Users/{ids.object_id(mb.smtp)}/Events/{event_id}"
            notification = {"subscriptionId": sub.id, "subscriptionExpirationDateTime": _stamp(sub.expiration),
                            "changeType": change, "resource": resource,
                            "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "@odata.id": resource,
                                             "@odata.etag": f'W/"{iid}"', "id": event_id},
                            "clientState": sub.client_state, "tenantId": self.graph.config.tenant_id}
            if sub.needs_reauthorization:
                sub.lost += 1
                continue
            self.graph.sim.spawn(self._deliver(sub, sub.notification_url, {"value": [notification]}))

    async def _deliver(self, sub: Subscription, url: str, payload: dict[str, Any], *, lifecycle: bool = False) -> None:
        timeout = aiohttp.ClientTimeout(total=self.graph.config.delivery_timeout)
        backoff = (0.0, *self.graph.config.delivery_backoff)
        for delay in backoff:
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self.session().post(url, json=payload, timeout=timeout) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        sub.delivered += 1
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            sub.failed_attempts += 1
        sub.dropped += 1
        log.info("graph.notification_dropped", subscription=sub.id, url=url, lifecycle=lifecycle)
        if not lifecycle and sub.id in self.items:
            self._send_lifecycle(sub, "missed")
