"""The control API's Graph part (``/control/graph/...``): what a test does to Exchange Online and Entra ID —
expire the client secret, start a throttling storm, apply an application access policy, expire delta tokens,
shorten subscriptions and fire lifecycle events, create, change and delete users, change a room list's rooms.
Handlers take (request, Control, body) like control.py's."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.simulator.control import Control

Handler = Callable[[web.Request, "Control", dict[str, Any]], Awaitable[Any]]


def _error(message: str, code: str = "bad_request", status: int = 400) -> Exception:
    from gateway.simulator.control import ControlError

    return ControlError(status, code, message)


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _error(f"unknown field(s) {unknown}; allowed: {list(allowed)}", "unknown_field")


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _error(f"{name}: expected a number between {lo} and {hi}", "out_of_range")
    return float(value)


def state(ctl: Control) -> dict[str, Any]:
    graph = ctl.sim.graph
    app = graph.tokens.apps[graph.config.client_id]
    return {
        "graph_url": graph.graph_url, "authority": graph.authority, "tenant_id": graph.config.tenant_id,
        "client_id": graph.config.client_id, "secret_expired": app.secret_expired,
        "certificates": len(set(app.certificates.values())), "tokens_issued": graph.tokens.issued,
        "throttled": graph.limits.throttled,
        "access_policy": sorted(graph.limits.policy) if graph.limits.policy is not None else None,
        "calls": {f"{route} {status}": n for (route, status), n in sorted(graph.calls.items())},
    }


async def _state(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return state(ctl)


async def _credentials(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("secret_expired", "remove_certificates", "expire_tokens", "token_lifetime", "add_certificate",
                 "user_read_all"))
    graph = ctl.sim.graph
    if "user_read_all" in body:  # the application permission User.Read.All granted (true) or not
        if not isinstance(body["user_read_all"], bool):
            raise _error("user_read_all: expected true or false")
        graph.users.permitted = body["user_read_all"]
    app = graph.tokens.apps[graph.config.client_id]
    if "token_lifetime" in body:  # seconds; msal renews a token with less than five minutes left
        graph.tokens.lifetime = int(_number(body, "token_lifetime", 1, 86_400))
    if "add_certificate" in body:  # the PEM of a certificate whose key may sign client assertions from now on
        try:
            app.add_certificate(str(body["add_certificate"]).encode())
        except ValueError as e:
            raise _error(f"add_certificate: not a PEM certificate ({e})") from None
    if "secret_expired" in body:
        if not isinstance(body["secret_expired"], bool):
            raise _error("secret_expired: expected true or false")
        app.secret_expired = body["secret_expired"]
    if body.get("remove_certificates"):
        app.remove_certificates()
    if body.get("expire_tokens"):
        graph.tokens.expire_tokens()
    return state(ctl)


async def _throttle(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """A throttling storm: every Graph request answers 429 for ``seconds`` (0 ends it)."""
    _only(body, ("seconds", "retry_after", "mailbox_concurrency", "latency"))
    limits = ctl.sim.graph.limits
    if "latency" in body:  # seconds every Graph call holds its mailbox slot, like a busy server
        ctl.sim.graph.config.latency = _number(body, "latency", 0, 60)
    if "mailbox_concurrency" in body:
        limits.mailbox_concurrency = int(_number(body, "mailbox_concurrency", 1, 1000))
    if "seconds" in body:
        retry_after = int(_number(body, "retry_after", 0, 3600)) if "retry_after" in body else 1
        limits.storm(_number(body, "seconds", 0, 3600), retry_after)
    return state(ctl)


async def _access_policy(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """New-ApplicationAccessPolicy -AccessRight RestrictAccess: only ``mailboxes`` stay reachable (DELETE: none)."""
    limits = ctl.sim.graph.limits
    if request.method == "DELETE":
        limits.policy = None
        return state(ctl)
    _only(body, ("mailboxes",))
    mailboxes = body.get("mailboxes")
    if not isinstance(mailboxes, list) or not all(isinstance(m, str) for m in mailboxes):
        raise _error("mailboxes: expected a list of e-mail addresses (the policy's security group)")
    limits.policy = frozenset(m.lower() for m in mailboxes)
    return state(ctl)


async def _expire_delta(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """Delta tokens (of one mailbox, or all) are forgotten: the next use answers 410 with ``code``."""
    _only(body, ("mailbox", "code", "users"))
    if body.get("users"):  # the user delta's tokens (/users/delta), not the calendars'
        return {"expired": ctl.sim.graph.users.expire()}
    code = body.get("code", "SyncStateNotFound")
    if code not in ("SyncStateNotFound", "resyncRequired"):
        raise _error("code: expected SyncStateNotFound or resyncRequired")
    mailbox = body.get("mailbox")
    if mailbox is not None and not isinstance(mailbox, str):
        raise _error("mailbox: expected an e-mail address")
    return {"expired": ctl.sim.graph.delta.expire(mailbox, code)}


async def _subscriptions(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """GET: every subscription; PATCH: ``max_minutes`` (the longest expiry granted), ``notify_ca_bundle`` (the PEM
    that verifies notification URLs), ``validation_timeout``."""
    subs = ctl.sim.graph.subscriptions
    if request.method == "PATCH":
        _only(body, ("max_minutes", "notify_ca_bundle", "validation_timeout"))
        if "max_minutes" in body:
            subs.max_minutes = _number(body, "max_minutes", 0.01, 100_000)
        if "validation_timeout" in body:  # seconds a notification URL has to echo the token (Graph: 10)
            ctl.sim.graph.config.validation_timeout = _number(body, "validation_timeout", 0.1, 60)
        if "notify_ca_bundle" in body:
            path = body["notify_ca_bundle"]
            if path is not None and not isinstance(path, str):
                raise _error("notify_ca_bundle: expected the path of a PEM file, or null for the system CAs")
            if path is not None:
                try:
                    ssl.create_default_context(cafile=path)
                except (OSError, ssl.SSLError) as e:
                    raise _error(f"notify_ca_bundle: cannot load {path} as a CA bundle ({e})") from None
            ctl.sim.graph.config.notify_ca_bundle = path
    return {"max_minutes": subs.max_minutes, "validations": subs.validations,
            "subscriptions": [{"id": s.id, "mailbox": s.mailbox, "resource": s.resource,
                               "notification_url": s.notification_url, "lifecycle_url": s.lifecycle_url,
                               "expiration": s.expiration.isoformat(), "delivered": s.delivered,
                               "failed_attempts": s.failed_attempts, "dropped": s.dropped, "lost": s.lost,
                               "needs_reauthorization": s.needs_reauthorization}
                              for s in subs.items.values()]}


async def _lifecycle(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """Fire a lifecycle event (reauthorizationRequired, subscriptionRemoved, missed) at a subscription."""
    _only(body, ("event",))
    try:
        sub = ctl.sim.graph.subscriptions.lifecycle(request.match_info["id"], str(body.get("event")))
    except KeyError:
        raise _error(f"no subscription {request.match_info['id']}", "unknown_subscription", 404) from None
    except ValueError as e:
        raise _error(str(e), "bad_lifecycle_event") from None
    return {"id": sub.id, "lifecycle_url": sub.lifecycle_url, "sent": sub.lifecycle_url is not None}


async def _expire_subscriptions(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("ids",))
    ids = body.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise _error("ids: expected a list of subscription ids (or none for all)")
    return {"expired": ctl.sim.graph.subscriptions.expire(ids)}


async def _users(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """POST: a user created in Entra ID (``mail`` and properties; a deleted one is restored); PATCH
    ``/users/{user}``: its properties (accountEnabled, department, jobTitle, displayName, ...); DELETE: deleted
    (soft, as Entra ID does by default; ``permanent``: for good)."""
    from gateway.simulator.graph.errors import GraphError

    users = ctl.sim.graph.users
    try:
        if request.method == "POST":
            mail = body.pop("mail", None)
            if not isinstance(mail, str) or "@" not in mail:
                raise _error("mail: expected the new user's e-mail address")
            return users.create(mail, body)
        user = request.match_info["user"]
        if request.method == "PATCH":
            return users.update(user, body)
        _only(body, ("permanent",))
        users.delete(user, permanent=bool(body.get("permanent")))
        return {"deleted": user}
    except GraphError as e:
        raise _error(f"no user {request.match_info.get('user')} ({e.code})", "unknown_user", 404) from None
    except ValueError as e:
        raise _error(str(e)) from None


async def _room_list(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    """PUT: the rooms of a room list (made if new); DELETE: the list gone. Exchange's room lists are the
    directory's, so EWS's ExpandDL and Graph's Places see the change alike (Add-DistributionGroupMember,
    Remove-DistributionGroupMember, Remove-DistributionGroup)."""
    d = ctl.sim.directory
    address = request.match_info["list"].lower()
    if request.method == "DELETE":  # Remove-DistributionGroup
        if d.room_lists.pop(address, None) is None:
            raise _error(f"no room list {address}", "unknown_room_list", 404)
        return {"deleted": address}
    _only(body, ("rooms", "name"))
    rooms = body.get("rooms")
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise _error("rooms: expected a list of room addresses")
    unknown = [r for r in rooms if (mb := d.find(r)) is None or mb.kind != "room"]
    if unknown:
        raise _error(f"not rooms of the directory: {unknown}", "unknown_room")
    name = body.get("name") or (d.room_lists[address][0] if address in d.room_lists else address.split("@")[0])
    d.add_room_list(address, str(name), rooms)
    return {"room_list": address, "name": name, "rooms": [r.lower() for r in rooms]}


ROUTES: list[tuple[str, str, Handler, int]] = [
    ("GET", "/control/graph", _state, 200),
    ("POST", "/control/graph/credentials", _credentials, 200),
    ("POST", "/control/graph/throttle", _throttle, 200),
    ("PUT", "/control/graph/access-policy", _access_policy, 200),
    ("DELETE", "/control/graph/access-policy", _access_policy, 200),
    ("POST", "/control/graph/delta/expire", _expire_delta, 200),
    ("GET", "/control/graph/subscriptions", _subscriptions, 200),
    ("PATCH", "/control/graph/subscriptions", _subscriptions, 200),
    ("POST", "/control/graph/subscriptions/expire", _expire_subscriptions, 200),
    ("POST", "/control/graph/subscriptions/{id}/lifecycle", _lifecycle, 200),
    ("POST", "/control/graph/users", _users, 200),
    ("PATCH", "/control/graph/users/{user}", _users, 200),
    ("DELETE", "/control/graph/users/{user}", _users, 200),
    ("PUT", "/control/graph/room-lists/{list}", _room_list, 200),
    ("DELETE", "/control/graph/room-lists/{list}", _room_list, 200),
]
