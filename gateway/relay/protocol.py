"""The relay protocol, version 1: message encode/decode and validation (pure; docs/relay-protocol.md is the spec).

One WebSocket (``wss://HUB/v1/tunnel``, subprotocol ``exchange-gateway.v1``), dialled by the gateway. Every
message is one JSON text frame, an object with a ``type``. In order:

    hub     -> challenge {nonce, hub}                        fresh random nonce for this connection only
    gateway -> hello {protocol, gateway_id, key_id, signature, agent, last_seq, replica?: {ordinal, count}}
    hub     -> welcome {ack, session, window, heartbeat,     or error {code} and close
                        notifications?}                      the gateway's Graph webhook URLs at the hub
    gateway -> events {events: [{seq, room_seq, event}]}     seq > ack, increasing; at most `window` unacked
    hub     -> ack {seq}                                     cumulative: every event up to seq is stored durably
    hub     -> command {command}                             a booking command (see parse_command)
    gateway -> result {result}                               exactly one per command, matched by key
    gateway -> rotate_key {public_key, key_id, signature}    signed by the new key over the session's nonce
    hub     -> key_rotated {key_id}
    hub     -> notification {lifecycle, body}                a Graph change notification posted to the hub
    either  -> error {code, message, ref?}                   a bad message: the connection stays up

The signature in ``hello`` is Ed25519 over ``signed_challenge(nonce, gateway_id, key_id)``: a recorded hello
does not answer any other connection's nonce, so it cannot be replayed.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from gateway.errors import ProtocolError
from gateway.model import COMMAND_TYPES, Command, CommandResult, Person

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "exchange-gateway.v1"
TUNNEL_PATH: Final = "/v1/tunnel"
ENROLL_PATH: Final = "/v1/enroll"
MAX_MESSAGE_BYTES: Final = 1 << 20  # a frame larger than this is refused (error too_large), the tunnel stays up
MAX_COMMAND_BYTES: Final = 64 << 10
MAX_JSON_DEPTH: Final = 32  # objects/arrays within each other; a command needs 3, an events message about 8
MAX_SEQ: Final = (1 << 63) - 1  # sequence numbers and SSE ids are SQLite integers
DEFAULT_WINDOW: Final = 2000  # unacknowledged events in flight
MAX_BATCH: Final = 500  # events per `events` message
NONCE_BYTES: Final = 32

MAX_NOTIFICATION_BYTES: Final = 256 << 10  # a Graph notification body (the hub answers 413 above it)
MAX_NOTIFICATION_URL: Final = 2048
GRAPH_PATH: Final = "/v1/graph/{route}/"  # + notifications / lifecycle: where Graph posts, on the hub

MESSAGE_TYPES: Final = ("challenge", "hello", "welcome", "events", "ack", "command", "result", "rotate_key",
                        "key_rotated", "error", "notification")

# Error codes: in `error` messages, and as the `reason` of a failed command result.
ERROR_CODES: Final = {
    # connection
    "unauthorized": "the gateway is not enrolled, the key is unknown, or the signature is wrong",
    "revoked": "the gateway was revoked at the hub; enroll it again with a new token",
    "unsupported_protocol": "the peer speaks a protocol version this side does not",
    "bad_message": "the message is not valid JSON or does not follow the schema",
    "too_large": "the message is larger than the protocol allows",
    "unexpected": "the message type is not valid at this point of the conversation",
    # commands
    "invalid_command": "the command does not follow the command schema; see message",
    "unsupported_command": "the command type is unknown",
    "idempotency_conflict": "this idempotency key was used before with a different request",
    "not_found": "the booking does not exist (any more)",
    "not_created_by_gateway": "only bookings the gateway created can be changed or cancelled; decline instead",
    "rate_limited": "too many commands; retry later",
    "exchange_unavailable": "Exchange could not be reached or is throttling; retry later",
    "exchange_auth": "Exchange refused the gateway's service account or its impersonation rights; see message",
    "attendant_timeout": "the room's booking attendant has not answered yet; retry the same key to learn the answer",
    "gateway_offline": "the hub has no tunnel to this customer's gateway right now",
    "internal": "an unexpected error; the gateway logged it",
}

_KEY_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_EMAIL_RE = re.compile(r"[^@\s]{1,128}@[^@\s]{1,255}")
# RFC 3339 date-time (what command.v1.json accepts); fromisoformat alone also takes "09:00Z", a space for T...
_TIME_RE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                      r"(\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
MAX_SUBJECT = 255
MAX_ATTENDEES = 100
MAX_AVAILABILITY_ROOMS = 100
MAX_AVAILABILITY_RANGE = timedelta(days=42)


def encode(msg_type: str, **fields: Any) -> str:
    assert msg_type in MESSAGE_TYPES, msg_type
    return json.dumps({"type": msg_type, **fields}, separators=(",", ":"), default=str)


# -- untrusted JSON ----------------------------------------------------------------------------------------------
# A JSON string (its closing quote optional, so an unterminated one ends the scan instead of being retried from
# every later quote: linear time on any input).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def loads(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted text: ValueError, with a message that says what is wrong, for text that is not
    UTF-8 JSON, that nests objects and arrays deeper than ``max_depth`` (json.loads would recurse until a
    RecursionError around 1000 levels), or whose strings hold an unpaired UTF-16 surrogate escape such as
    ``"\\ud800"`` (not a character: it cannot be stored, hashed or sent on as UTF-8)."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if _too_deep(text, max_depth):
        raise ValueError(_too_deep_message(max_depth))
    try:
        value = json.loads(text)
    except RecursionError:  # unreachable after the depth check; kept so no parser error can escape as a crash
        raise ValueError(_too_deep_message(max_depth)) from None
    except ValueError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):  # the only way a lone surrogate gets in; a pair decodes to one character
        where = unpaired_surrogate(value)
        if where is not None:
            raise ValueError(_surrogate_message(where))
    return value


def _too_deep_message(limit: int) -> str:
    return f"JSON nested more than {limit} levels deep (objects and arrays within each other)"


def _surrogate_message(where: str) -> str:
    return (f"{where} holds an unpaired UTF-16 surrogate (\\ud800-\\udfff alone), which is not a character; send "
            "the text as UTF-8, or escape a whole surrogate pair")


def _too_deep(text: str, limit: int) -> bool:
    """Whether objects and arrays nest deeper than ``limit``, without parsing. Counting every bracket, those in
    strings too, gives an upper bound that is exact unless a string holds brackets; only when it exceeds the limit
    are the strings cut out and the brackets counted exactly."""
    if not _bound_exceeds(_brackets(text), limit):
        return False
    skeleton = _brackets(_JSON_STRING.sub("", text))
    if not _bound_exceeds(skeleton, limit):
        return False
    depth = 0
    for c in skeleton:  # exact, left to right as the parser goes; rare, and it stops early
        depth += 1 if c == 0x5B else -1
        if depth > limit:
            return True
        if depth < 0:
            return False  # the parser refuses the text at this point, before any later nesting
    return False


def _brackets(text: str) -> bytes:
    """The brackets of ``text`` alone, ``{}`` as ``[]`` (in C: UTF-8 never has these bytes inside a character)."""
    return text.encode("utf-8", "surrogatepass").translate(_ONE_KIND, _NOT_BRACKETS)


def _bound_exceeds(brackets: bytes, limit: int) -> bool:
    """Whether brackets may nest deeper than ``limit``: each pass removes the innermost pairs, so ``limit`` passes
    empty anything nested at most that deep (unbalanced text may also stay non-empty)."""
    if b"[" * (limit + 1) in brackets:  # the usual attack, found in one search
        return True
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def unpaired_surrogate(value: Any, path: str = "$") -> str | None:
    """The path (``$.subject``, ``$.attendees[0].name``) of the first string, or key, that holds a lone surrogate;
    None when there is none. Recursion is bounded by the depth the value was parsed with."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{path}.{k[:40]}" if isinstance(k, str) and _encodable(k) else None
            if name is None:
                return f"a key in {path}"
            found = unpaired_surrogate(v, name)
            if found is not None:
                return found
    elif isinstance(value, list):
        for n, v in enumerate(value):
            found = unpaired_surrogate(v, f"{path}[{n}]")
            if found is not None:
                return found
    return None


def _encodable(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_event_id(raw: str) -> int:
    """An SSE ``Last-Event-ID`` (or ``?after=``): a decimal id of this stream, 0 for the start. ProtocolError with
    key ``invalid_last_event_id`` for anything else (a 30-digit number included: ids are 64-bit)."""
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_SEQ)) or int(text) > MAX_SEQ:
        raise ProtocolError(f"Last-Event-ID (or ?after=) must be the id of an event from this stream, a whole "
                            f"number from 0 to {MAX_SEQ}, not {raw[:40]!r}", key="invalid_last_event_id")
    return int(text)


def event_id_ahead(after: int, last: int) -> dict[str, Any]:
    """The problem document (409) for a resume point past the end of the stream: the server's store was reset or
    restored from a backup since the client read it, so waiting for ``after`` to come would skip every event."""
    return {"error": "last_event_id_ahead",
            "message": f"Last-Event-ID {after} is beyond the last event of this stream ({last}): the store was "
                       "reset or restored from a backup since you read it, so events you have not seen carry ids "
                       "you have. Read the current state again (the rooms and their bookings), then resume with "
                       f"Last-Event-ID: {last}, or 0 for every event still kept",
            "last_event_id": last}


# -- messages ----------------------------------------------------------------------------------------------------
def decode(text: str | bytes, *, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """One frame -> a message dict with a known ``type``; ProtocolError (key bad_message / too_large) otherwise."""
    if len(text) > limit:
        raise ProtocolError(f"message of {len(text)} bytes is larger than {limit}", key="too_large")
    try:
        msg = loads(text)
    except ValueError as e:
        raise ProtocolError(f"the message is not usable JSON: {e}", key="bad_message") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("message must be a JSON object with a string 'type'", key="bad_message")
    if msg["type"] not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg['type'][:40]!r}", key="bad_message")
    return msg


def notification_urls(welcome: dict[str, Any]) -> tuple[str, str] | None:
    """(url, lifecycle_url) from ``welcome.notifications``: None when the hub sent none (an older hub).
    ProtocolError (bad_message) when the field is there but is not two https URLs."""
    raw = welcome.get("notifications")
    if raw is None:
        return None
    urls = (raw.get("url"), raw.get("lifecycle_url")) if isinstance(raw, dict) else (None, None)
    for url in urls:
        if not isinstance(url, str) or not url.startswith("https://") or len(url) > MAX_NOTIFICATION_URL:
            raise ProtocolError(f"welcome.notifications must be {{url, lifecycle_url}}, two https:// URLs of at "
                                f"most {MAX_NOTIFICATION_URL} characters", key="bad_message")
    return str(urls[0]), str(urls[1])


def parse_notification(msg: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(lifecycle, body) of a ``notification`` message; ProtocolError (bad_message) otherwise. The body is what Graph
    posted to the hub (at most MAX_NOTIFICATION_BYTES there), an object with a ``value`` list; decode() bounded its
    size (the frame) and depth. Nothing in it is trusted: it is a trigger."""
    lifecycle, body = msg.get("lifecycle"), msg.get("body")
    if type(lifecycle) is not bool:
        raise ProtocolError("notification.lifecycle must be true or false", key="bad_message")
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        raise ProtocolError("notification.body must be an object with a 'value' list (what Graph posted)",
                            key="bad_message")
    return lifecycle, body


def hello_replica(hello: dict[str, Any]) -> tuple[int, int] | None:
    """The optional ``replica`` of a hello: (ordinal, count) of a gateway that is one of several sharing the rooms
    (gateway/sharding.py); None when absent. ProtocolError (bad_message) when malformed."""
    raw = hello.get("replica")
    if raw is None:
        return None
    ordinal = raw.get("ordinal") if isinstance(raw, dict) else None
    count = raw.get("count") if isinstance(raw, dict) else None
    if type(ordinal) is not int or type(count) is not int or not 0 <= ordinal < count <= 1000:
        raise ProtocolError("hello.replica must be {ordinal, count} with 0 <= ordinal < count <= 1000",
                            key="bad_message")
    return ordinal, count


def signed_challenge(nonce: str, gateway_id: str, key_id: str) -> bytes:
    """The bytes a gateway signs to answer a challenge (domain-separated from everything else it signs)."""
    return f"exchange-gateway tunnel v1\n{nonce}\n{gateway_id}\n{key_id}".encode()


def signed_enrollment(token: str, public_key: str) -> bytes:
    """The bytes a gateway signs with its new key when it enrolls (proves it holds the private key)."""
    return f"exchange-gateway enroll v1\n{token}\n{public_key}".encode()


def signed_rotation(nonce: str, gateway_id: str, new_key_id: str) -> bytes:
    return f"exchange-gateway rotate v1\n{nonce}\n{gateway_id}\n{new_key_id}".encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ProtocolError("invalid base64url value", key="bad_message") from None


# -- commands ---------------------------------------------------------------------------------------------------
def _invalid(key: str, message: str) -> ProtocolError:
    return ProtocolError(message, key="invalid_command", command_key=key)


def _time(d: dict[str, Any], name: str, key: str) -> datetime | None:
    value = d.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(key, f"'{name}' must be an RFC 3339 date-time string")
    if not _TIME_RE.fullmatch(value):
        raise _invalid(key, f"'{name}' must be an RFC 3339 date-time with seconds and a UTC offset, e.g. "
                            f"2026-11-21T09:00:00Z: {value[:40]!r}")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid(key, f"'{name}' is not an ISO-8601 date-time: {value[:40]!r}") from None
    if t.tzinfo is None:
        raise _invalid(key, f"'{name}' needs a UTC offset (e.g. 2026-11-21T09:00:00Z): {value[:40]!r}")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-01:00 is past the last datetime once in UTC
        raise _invalid(key, f"'{name}' lies outside the dates the gateway can represent: {value[:40]!r}") from None


def _person(value: Any, name: str, key: str, *, email_required: bool) -> Person | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(key, f"'{name}' must be an object with 'email' and/or 'name'")
    unknown = sorted(map(str, set(value) - {"email", "name"}))
    if unknown:
        raise _invalid(key, f"unknown field(s) in '{name}': {', '.join(unknown)}")
    email, display = value.get("email"), value.get("name")
    if email is not None and (not isinstance(email, str) or not _EMAIL_RE.fullmatch(email)):
        raise _invalid(key, f"'{name}.email' is not an email address")
    if display is not None and (not isinstance(display, str) or len(display) > MAX_SUBJECT):
        raise _invalid(key, f"'{name}.name' must be a string of at most {MAX_SUBJECT} characters")
    if email_required and not email:
        raise _invalid(key, f"'{name}.email' is required")
    return Person(email.lower() if email else None, display)


def _room(value: Any, key: str, name: str = "room") -> str:
    if not isinstance(value, str) or not _EMAIL_RE.fullmatch(value):
        raise _invalid(key, f"'{name}' must be a room mailbox address")
    return value.lower()


ALLOWED_FIELDS: Final = {
    "create": {"room", "start", "end", "subject", "organizer", "booker", "attendees"},
    "update": {"room", "booking_id", "start", "end"},
    "cancel": {"room", "booking_id"},
    "decline": {"room", "booking_id", "message"},
    "resync": {"room"},
    "availability": {"rooms", "start", "end"},
}


def parse_command(d: Any, *, now: datetime | None = None) -> Command:
    """Validate a command object (docs/relay-protocol.md, schemas/relay/command.v1.json) into a Command.

    Raises ProtocolError with key ``invalid_command`` or ``unsupported_command`` and, when the command had a
    usable ``key``, the attribute ``command_key`` so the caller can answer with a failed result for that key.
    """
    now = now or datetime.now(UTC)
    if not isinstance(d, dict):
        raise ProtocolError("a command must be a JSON object", key="invalid_command")
    key = d.get("key")
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ProtocolError("'key' (the idempotency key) is required: 1-128 characters of A-Z a-z 0-9 . _ : -",
                            key="invalid_command")
    where = unpaired_surrogate(d)  # such text could not be written to Exchange (nor stored, nor logged as UTF-8)
    if where is not None:
        raise _invalid(key, _surrogate_message(where))
    kind = d.get("type")
    if kind not in COMMAND_TYPES:
        raise ProtocolError(f"unknown command type {str(kind)[:40]!r}; one of {', '.join(COMMAND_TYPES)}",
                            key="unsupported_command", command_key=key)
    extra = set(d) - ALLOWED_FIELDS[kind] - {"key", "type"}
    if extra:
        raise _invalid(key, f"unknown field(s) for {kind}: {', '.join(sorted(extra))}")
    start, end = _time(d, "start", key), _time(d, "end", key)
    fields: dict[str, Any] = {"key": key, "type": kind, "received_at": now}
    if kind == "availability":
        rooms = d.get("rooms")
        if not isinstance(rooms, list) or not rooms or len(rooms) > MAX_AVAILABILITY_ROOMS:
            raise _invalid(key, f"'rooms' must be a list of 1 to {MAX_AVAILABILITY_ROOMS} room addresses")
        fields["rooms"] = tuple(_room(r, key, "rooms[]") for r in rooms)
        if start is None or end is None:
            raise _invalid(key, "'start' and 'end' are required")
        if end <= start:
            raise _invalid(key, "'end' must be after 'start'")
        if end - start > MAX_AVAILABILITY_RANGE:
            raise _invalid(key, f"the range may be at most {MAX_AVAILABILITY_RANGE.days} days")
        return Command(start=start, end=end, **fields)
    fields["room"] = _room(d.get("room"), key)
    if kind in ("update", "cancel", "decline"):
        booking_id = d.get("booking_id")
        if not isinstance(booking_id, str) or not 1 <= len(booking_id) <= 128:
            raise _invalid(key, "'booking_id' (as relayed in events) is required")
        fields["booking_id"] = booking_id
    if kind == "decline":
        message = d.get("message")
        if message is not None and (not isinstance(message, str) or len(message) > 2000):
            raise _invalid(key, "'message' must be a string of at most 2000 characters")
        fields["message"] = message
    if kind in ("create", "update"):
        if start is None or end is None:
            raise _invalid(key, "'start' and 'end' are required")
        if end <= start:
            raise _invalid(key, "'end' must be after 'start' (the times are reversed or equal)")
        if end <= now:
            raise _invalid(key, "the booking ends in the past")
        fields["start"], fields["end"] = start, end
    if kind == "create":
        subject = d.get("subject")
        if subject is not None and (not isinstance(subject, str) or len(subject) > MAX_SUBJECT):
            raise _invalid(key, f"'subject' must be a string of at most {MAX_SUBJECT} characters")
        fields["subject"] = subject
        fields["organizer"] = _person(d.get("organizer"), "organizer", key, email_required=True)
        fields["booker"] = _person(d.get("booker"), "booker", key, email_required=False)
        if fields["organizer"] and fields["booker"]:
            raise _invalid(key, "give either 'organizer' (a directory user) or 'booker' (anyone else), not both")
        attendees = [] if d.get("attendees") is None else d["attendees"]
        if not isinstance(attendees, list) or len(attendees) > MAX_ATTENDEES:
            raise _invalid(key, f"'attendees' must be a list of at most {MAX_ATTENDEES} people")
        if any(not isinstance(a, dict) for a in attendees):
            raise _invalid(key, "every item of 'attendees' must be an object with an 'email'")
        people = tuple(_person(a, "attendees[]", key, email_required=True) for a in attendees)
        fields["attendees"] = tuple(p for p in people if p is not None)
        if fields["attendees"] and not fields["organizer"]:
            raise _invalid(key, "'attendees' need an 'organizer': the room itself may not invite people")
    return Command(**fields)


def command_to_json(cmd: Command) -> dict[str, Any]:
    """The wire form of a command (the inverse of parse_command)."""
    def person(p: Person | None) -> dict[str, Any] | None:
        return None if p is None else {k: v for k, v in (("email", p.email), ("name", p.name)) if v is not None}

    def iso(t: datetime | None) -> str | None:
        return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    out: dict[str, Any] = {"key": cmd.key, "type": cmd.type}
    values = {"room": cmd.room, "rooms": list(cmd.rooms) or None, "start": iso(cmd.start), "end": iso(cmd.end),
              "subject": cmd.subject, "organizer": person(cmd.organizer), "booker": person(cmd.booker),
              "attendees": [person(a) for a in cmd.attendees] or None, "booking_id": cmd.booking_id,
              "message": cmd.message}
    out.update({k: v for k, v in values.items() if v is not None and k in ALLOWED_FIELDS[cmd.type]})
    return out


def result_message(result: CommandResult) -> str:
    return encode("result", result=result.to_json())


def key_id_for(public_key: bytes) -> str:
    """A gateway key's id: a digest of the raw 32-byte Ed25519 public key."""
    import hashlib

    return "k_" + b64(hashlib.sha256(public_key).digest()[:16])
