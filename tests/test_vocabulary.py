"""The model's string vocabularies are enums whose JSON is the string it always was."""

import json
from datetime import UTC, datetime

import pytest

from gateway.model import (
    COMMAND_TYPES,
    DECLINE_REASONS,
    EVENT_TYPES,
    RESULT_STATUSES,
    ROOM_STATES,
    Command,
    CommandResult,
    CommandType,
    DeclineReason,
    Event,
    EventType,
    ResultStatus,
    Room,
    RoomState,
    declined,
)


def test_each_vocabulary_is_an_enum_that_serializes_as_its_string():
    assert json.dumps([CommandType.CREATE, ResultStatus.DECLINED, DeclineReason.TOO_LONG, RoomState.VERIFIED,
                       EventType.BOOKING_CREATED]) == json.dumps(
        ["create", "declined", "too_long", "verified", "com.exchangegateway.booking.created.v1"])
    assert f"{RoomState.SUSPECT_EMPTY}" == "suspect_empty"
    assert list(COMMAND_TYPES) == ["create", "update", "cancel", "decline", "resync", "availability"]
    assert list(RESULT_STATUSES) == ["accepted", "declined", "failed"]
    assert EVENT_TYPES["room_state"] is EventType.ROOM_STATE_CHANGED and set(DECLINE_REASONS) == set(DeclineReason)
    assert ROOM_STATES[RoomState.DISCONNECTED] == RoomState.DISCONNECTED.remedy == (
        "removed from the gateway (`gateway rooms forget`); its bookings were withdrawn")


def test_values_read_from_json_or_text_become_members_and_unknown_ones_are_refused():
    result = CommandResult.from_json({"key": "k", "status": "declined", "reason": "conflict"})
    assert result.status is ResultStatus.DECLINED and result.to_json()["status"] == "declined"
    assert Room("r@x", state="verified").state is RoomState.VERIFIED  # type: ignore[arg-type]
    assert Command("k", "create").type is CommandType.CREATE  # type: ignore[arg-type]
    event = Event("e", EventType.BOOKING_DELETED, "r@x", "b", datetime(2026, 1, 1, tzinfo=UTC), {})
    assert json.loads(json.dumps(event.to_cloudevent()))["type"] == "com.exchangegateway.booking.deleted.v1"
    with pytest.raises(ValueError):
        CommandResult.from_json({"key": "k", "status": "maybe"})
    with pytest.raises(ValueError):
        Room("r@x", state="sleepy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        declined(Command("k", CommandType.CREATE), "because", "no")
