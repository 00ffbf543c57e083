"""JSON logs keep stack traces, from structlog and from the standard library (aiohttp, asyncio) alike."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gateway.observability.logging import configure_logging


def fail() -> None:
    raise ZeroDivisionError("division by zero")


def test_json_logs_keep_the_stack_trace_of_every_logger() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        fail()
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
        structlog.get_logger("t").exception("feed.crashed", room="room1@contoso.com")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["Error handling request", "feed.crashed"]
    for line in lines:
        assert "traceback object" not in json.dumps(line), line
        assert line["exception"].startswith("Traceback (most recent call last):"), line
        assert "in fail" in line["exception"] and "ZeroDivisionError: division by zero" in line["exception"]
