"""EWS operations. Each module registers its handlers with ``@operation("Name")``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from lxml import etree

if TYPE_CHECKING:
    from gateway.simulator.mailboxes import Mailbox
    from gateway.simulator.server import Simulator


@dataclass
class Context:
    """One EWS request: who is calling, as whom, in which version and time zone."""

    sim: Simulator
    principal: Mailbox  # the logon account
    mailbox: Mailbox  # the impersonated mailbox, or the logon account
    impersonating: bool
    version: str
    tz_context: str | None
    request: web.Request
    header: dict[str, etree._Element]
    response_headers: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Any:
        return self.sim.directory

    def may_open(self, mailbox: Mailbox) -> bool:
        """Whether this request may reach ``mailbox``'s folders and items.

        The mailbox the request acts as (the impersonated one, or the logon account's own) is always open; any
        other needs a delegate right (FullAccess). ApplicationImpersonation is not such a right: it lets an
        account act *as* a mailbox through the ExchangeImpersonation header, and only then.
        """
        return mailbox is self.mailbox or self.mailbox.smtp in mailbox.full_access

    def at_least(self, version: str) -> bool:
        from gateway.simulator.soap import ACCEPTED_VERSIONS

        try:
            return ACCEPTED_VERSIONS.index(self.version) >= ACCEPTED_VERSIONS.index(version)
        except ValueError:
            return True


Handler = Callable[[Context, etree._Element], Awaitable["etree._Element | web.StreamResponse"]]
# The ResponseCode of a response a handler writes itself (web.StreamResponse), for the call counters.
RESPONSE_CODE: web.ResponseKey[str] = web.ResponseKey("ews_response_code", str)
OPERATIONS: dict[str, Handler] = {}


def operation(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        OPERATIONS[name] = fn
        return fn
    return register


def load_all() -> dict[str, Handler]:
    """Import every operation module so that their handlers register."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return OPERATIONS
