import io
import json

import structlog

from gateway.errors import AuthError, GatewayError, ImpersonationDenied, Throttled, TransientError
from gateway.observability.logging import configure_logging


def test_json_logs_carry_event_and_fields_and_redact_secrets():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("t").info("sync.completed", room="room1@contoso.com", upserts=3, password="hunter2")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "sync.completed" and line["room"] == "room1@contoso.com" and line["upserts"] == 3
    assert line["password"] == "**********" and "hunter2" not in out.getvalue()
    assert line["level"] == "info" and "timestamp" in line


def test_console_logs_are_readable_lines():
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    structlog.get_logger("t").warning("room.unreachable", room="room2@contoso.com")
    text = out.getvalue()
    assert "room.unreachable" in text and "room=room2@contoso.com" in text and not text.lstrip().startswith("{")


def test_debug_is_filtered_at_info_level():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("t").debug("noise")
    assert out.getvalue() == ""


def test_error_tree_groups_by_what_to_do_and_names_the_fix():
    e = ImpersonationDenied("room7@contoso.com")
    assert isinstance(e, AuthError) and isinstance(e, GatewayError)
    assert e.key == "impersonation_denied" and "ApplicationImpersonation" in str(e)
    t = Throttled("busy", back_off=2.5)
    assert isinstance(t, TransientError) and t.back_off == 2.5 and t.key == "throttled"
    custom = GatewayError("x", key="mailbox_not_found", remedy="check the address")
    assert custom.key == "mailbox_not_found" and str(custom) == "x (check the address)"
