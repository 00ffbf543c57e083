"""The command endpoint both APIs serve (POST .../commands): the body in, the result out, one status table.

The answer is always a command result (schemas/relay/result.v1.json), whatever happened; its status says what
kind of outcome it is:

    200  the gateway decided: accepted, declined, or failed for a reason below not listed here
    400  failed invalid_command / unsupported_command: not a valid command, nothing was done (key "" when the
         command had no usable one)
    409  failed idempotency_conflict: the key was used before for a different request
    413  failed too_large: a command over protocol.MAX_COMMAND_BYTES (or a result too large for the relay)
    503  failed gateway_offline: no gateway to run it (the hub); retry the same key
    504  failed gateway_offline: the gateway did not answer in time (the hub); retry the same key
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.errors import ProtocolError
from gateway.model import Command, CommandResult, ResultStatus, failed
from gateway.relay import protocol
from gateway.web.params import read_limited

STATUS_OF_FAILURE: Final = {"invalid_command": 400, "unsupported_command": 400, "idempotency_conflict": 409,
                            "too_large": 413, "gateway_offline": 503}


def status_of(result: CommandResult) -> int:
    if result.status is not ResultStatus.FAILED:
        return 200
    return STATUS_OF_FAILURE.get(result.reason or "", 200)


async def read_command(request: web.Request) -> Command | CommandResult:
    """The command in the body, or the failed result that refuses it (nothing was done)."""
    body = await read_limited(request, protocol.MAX_COMMAND_BYTES)
    if body is None:
        return failed("", "too_large", f"the command is larger than {protocol.MAX_COMMAND_BYTES} bytes",
                      retryable=False)
    try:
        doc = protocol.loads(body)
    except ValueError as e:
        return failed("", "invalid_command", f"the body is not a usable JSON command: {e}", retryable=False)
    try:
        return protocol.parse_command(doc)
    except ProtocolError as e:
        return failed(e.command_key or "", e.key, str(e), retryable=False)


def answer(result: CommandResult, status: int | None = None) -> web.Response:
    """The result as the answer (``status``: an application's own, e.g. the hub's 504; default the table's)."""
    return web.json_response(result.to_json(), status=status or status_of(result))
