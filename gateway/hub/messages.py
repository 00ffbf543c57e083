"""What a gateway sends the hub, checked: public keys and signatures, ``events`` and ``result`` messages
(docs/relay-protocol.md, sections 3-8). Anything malformed is a ProtocolError (bad_message) naming the field."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.errors import ProtocolError
from gateway.hub.store import EventItem
from gateway.model import DECLINE_REASONS, RESULT_STATUSES, CommandResult
from gateway.relay import protocol


def raw_key(text: str) -> bytes | None:
    try:
        raw = protocol.unb64(text)
    except ProtocolError:
        return None
    return raw if len(raw) == 32 else None


def verified(public_key: bytes, signature: str, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(protocol.unb64(signature), data)
    except (InvalidSignature, ValueError, ProtocolError):
        return False
    return True


def event_items(msg: dict[str, Any]) -> list[EventItem]:
    events = msg.get("events")
    if not isinstance(events, list) or not events:
        raise ProtocolError("'events' must be a non-empty list", key="bad_message")
    if len(events) > protocol.MAX_BATCH:
        raise ProtocolError(f"at most {protocol.MAX_BATCH} events per message, not {len(events)}", key="bad_message")
    items: list[EventItem] = []
    previous = 0
    for n, e in enumerate(events):
        if not isinstance(e, dict):
            raise ProtocolError(f"events[{n}] must be an object", key="bad_message")
        seq, room_seq, ev = e.get("seq"), e.get("room_seq"), e.get("event")
        if type(seq) is not int or not previous < seq <= protocol.MAX_SEQ:
            raise ProtocolError(f"events[{n}].seq must be an integer above the one before it (at most "
                                f"{protocol.MAX_SEQ})", key="bad_message")
        if type(room_seq) is not int or not 1 <= room_seq <= protocol.MAX_SEQ:
            raise ProtocolError(f"events[{n}].room_seq must be an integer from 1 to {protocol.MAX_SEQ}",
                                key="bad_message")
        if not isinstance(ev, dict) or ev.get("specversion") != "1.0" or not _short_str(ev.get("id")) \
                or not _short_str(ev.get("type")) or not _short_str(ev.get("source"), 1024):
            raise ProtocolError(f"events[{n}].event must be a CloudEvent 1.0 (specversion, id, source, type)",
                                key="bad_message")
        previous = seq
        items.append(EventItem(seq, room_seq, ev))
    return items


def _short_str(value: Any, limit: int = 256) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def result_of(raw: Any) -> CommandResult:
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or raw.get("status") not in RESULT_STATUSES:
        raise ProtocolError("'result' must be an object with a string key and a status "
                            f"({', '.join(RESULT_STATUSES)})", key="bad_message")
    reason = raw.get("reason")
    if raw["status"] == "declined" and reason not in DECLINE_REASONS:
        raise ProtocolError(f"a declined result needs a reason: one of {', '.join(DECLINE_REASONS)}",
                            key="bad_message")
    if raw["status"] == "failed" and not isinstance(reason, str):
        raise ProtocolError("a failed result needs a reason (an error code)", key="bad_message")
    if raw.get("data") is not None and not isinstance(raw["data"], dict):
        raise ProtocolError("result.data must be an object", key="bad_message")
    return CommandResult.from_json(raw)
