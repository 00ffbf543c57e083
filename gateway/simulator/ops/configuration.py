"""GetUserConfiguration: the configuration objects (FAI messages) a folder keeps for clients, such as OWA's
"Calendar" or Outlook's "WorkHours".

The simulated mailboxes keep none, so every name answers what Exchange answers for a configuration that does not
exist: ErrorItemNotFound (after the folder itself has been found and the caller's right to it checked).
"""

from __future__ import annotations

from lxml import etree

from gateway.simulator.ops import Context, operation
from gateway.simulator.ops.folders import resolve_folder
from gateway.simulator.schema import MNS
from gateway.simulator.soap import EwsError, Responses


@operation("GetUserConfiguration")
async def get_user_configuration(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("GetUserConfiguration")
    name = body.find(f"{{{MNS}}}UserConfigurationName")
    assert name is not None and len(name)
    try:
        resolve_folder(ctx, name[0])
        raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
    except EwsError as e:
        out.error(e)
    return out.root
