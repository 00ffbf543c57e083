"""A small router over Graph requests, so the HTTP face and ``$batch`` dispatch the very same handlers."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from gateway.simulator.graph.errors import GraphError


@dataclass
class GraphRequest:
    """One Graph request, from the socket or from a ``$batch`` envelope. ``path`` is below ``/v1.0``."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any = None
    app_id: str = ""  # the client id the bearer token was issued to
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, method: str, url: str, headers: dict[str, str], body: Any) -> GraphRequest:
        path, _, qs = url.partition("?")
        return cls(method.upper(), path, dict(parse_qsl(qs, keep_blank_values=True)),
                   {k.lower(): v for k, v in headers.items()}, body)

    def prefer(self, name: str) -> str | None:
        """A ``Prefer`` preference's value (``odata.maxpagesize=5``, ``outlook.timezone="UTC"``)."""
        for part in re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", self.headers.get("prefer", "")):
            key, _, value = part.strip().partition("=")
            if key.strip().lower() == name.lower():
                return value.strip().strip('"')
        return None


@dataclass
class GraphResponse:
    status: int = 200
    body: Any = None  # JSON-serialisable, or None for an empty answer
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[GraphRequest], Awaitable[GraphResponse]]


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """``pattern`` names segments like ``/users/{user}/events/{event}``; matching ignores case, as Graph does."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}"))
        self._routes.append((method, re.compile(f"^{regex}/?$", re.IGNORECASE), handler))

    def resolve(self, request: GraphRequest) -> Handler:
        allowed = False
        for method, regex, handler in self._routes:
            m = regex.match(request.path)
            if m is None:
                continue
            if method != request.method:
                allowed = True
                continue
            request.params = {k: unquote(v) for k, v in m.groupdict().items()}
            return handler
        if allowed:
            raise GraphError(405, "Request_BadRequest", f"The method {request.method} is not allowed here.")
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{request.path.strip('/')}'.")
