"""The authenticated control endpoint. Placeholder until the full control API lands."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def add_control_routes(app: web.Application, sim: Any) -> None:
    pass
