"""structlog configuration: readable on a terminal, JSON lines otherwise (containers) or when asked."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_SECRET_KEYS = frozenset({"password", "secret", "token", "authorization", "api_key", "private_key"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in event:
        if key.lower() in _SECRET_KEYS:
            event[key] = "**********"
    return event


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger. ``fmt`` is ``auto``, ``json`` or ``console``."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = os.environ.get("GATEWAY_LOG_FORMAT", "auto")
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Records from the standard library (aiohttp, asyncio) carry exc_info as a tuple: JSON needs it as text, or a
    # stack trace becomes "<traceback object at ...>". The console renderer prints it itself, prettier.
    foreign_tail: list[Any] = [structlog.processors.format_exc_info] if fmt == "json" else []
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                                                        *foreign_tail, renderer], foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING) if numeric < logging.WARNING else numeric)
    # aiohttp's access log is noise at info level; exchangelib logs every retry at debug.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
