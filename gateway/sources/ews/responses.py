"""A room's decline text (the booking attendant's MeetingResponse body) -> a decline reason code. Pure: no I/O.

The Resource Booking Attendant says why it declined in words only (EnableResponseDetails, on by default). The
phrases differ a little between Exchange versions and languages; we match the distinctive part of each English
sentence, case-insensitively, in the plain text of the body (HTML bodies are stripped first). Anything we do not
recognise gives None: the command service then diagnoses the decline itself (e.g. a conflict check).
"""

from __future__ import annotations

import html
import re

# Most specific first: a "too long" or "booking window" text may also mention the time or a conflict.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((code, re.compile(pattern)) for code, pattern in (
    ("not_permitted", r"(do not|don't|does not|doesn't) have (the )?permission to (book|schedule)"
                      r"|not (permitted|authori[sz]ed|allowed) to (book|schedule)"),
    ("recurring_not_allowed", r"recurring (meetings?|appointments?|requests?) (are|is) not allowed"
                              r"|recurring (meetings?|appointments?|requests?) (aren't|isn't) allowed"
                              r"|(does not|doesn't) (allow|accept) recurring"),
    ("too_long", r"longer than the maximum( allowed)? duration|exceeds the maximum( allowed)? duration"
                 r"|maximum (meeting )?duration"),
    ("outside_booking_window", r"outside (of )?the booking window|beyond the booking window"
                               r"|booking window|scheduling horizon"),
    ("conflict", r"unavailable at the requested time|not available at the requested time"
                 r"|(is|are) (already )?(booked|reserved)|conflict"),
))
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def plain_text(body: str | None) -> str:
    """A body as one line of plain text (tags removed, entities decoded, whitespace collapsed)."""
    if not body:
        return ""
    text = body
    if "<" in text and ">" in text:
        text = _TAG.sub(" ", re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", " ", text))
    text = html.unescape(text).replace("\u2019", "'").replace("\u00a0", " ")
    return _SPACE.sub(" ", text).strip()


def reason_for(text: str | None) -> str | None:
    """The DECLINE_REASONS code a decline text names, or None when it names none we know."""
    normal = plain_text(text).lower()
    if not normal:
        return None
    for code, pattern in _PATTERNS:
        if pattern.search(normal):
            return code
    return None
