"""Meeting responses as they land in a mailbox: the "Accepted: ..." / "Declined: ..." messages an organizer gets.

When an attendee answers a meeting (a person with AcceptItem/DeclineItem, a room's booking attendant, or a room
declining through EWS), Exchange sends a MeetingResponse to the organizer: ItemClass IPM.Schedule.Meeting.Resp.Pos,
.Tent or .Neg, the subject prefixed with the answer, From/Sender the attendee, the meeting's UID and
CleanGlobalObjectId, and (from a room's attendant) a body that says why. The texts the attendant writes are here,
in ``DECLINE_REASON_TEXT`` and ``RESPONSE_TEXT``, so that a client can map a decline back to its reason.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.simulator.calendar import CalendarItem, Person

if TYPE_CHECKING:
    from gateway.simulator.mailboxes import Folder, Mailbox

# The sentence a room's booking attendant writes into a decline, by reason (EnableResponseDetails $true).
DECLINE_REASON_TEXT: dict[str, str] = {
    "conflict": "Your request was declined because the resource is unavailable at the requested time.",
    "outside_booking_window": "Your request was declined because it is outside the booking window of this resource.",
    "too_long": "Your request was declined because the meeting is longer than the maximum duration allowed for "
                "this resource.",
    "recurring_not_allowed": "Your request was declined because recurring meetings are not allowed for this "
                             "resource.",
    "not_permitted": "Your request was declined because you do not have permission to book this resource.",
}
# The attendant's text when it gives no details (EnableResponseDetails $false), and for its other answers.
RESPONSE_TEXT: dict[str, str] = {
    "Decline": "Your request was declined.",
    "Accept": "Your request was accepted.",
    "Tentative": "Your request was received and is waiting for approval by a delegate of this resource.",
}
RESPONSE_CLASS = {"Accept": "IPM.Schedule.Meeting.Resp.Pos", "Tentative": "IPM.Schedule.Meeting.Resp.Tent",
                  "Decline": "IPM.Schedule.Meeting.Resp.Neg"}
SUBJECT_PREFIX = {"Accept": "Accepted: ", "Tentative": "Tentative: ", "Decline": "Declined: "}


def attendant_text(response: str, reason: str = "", details: bool = True) -> str:
    """The body of a booking attendant's answer."""
    if response == "Decline" and details and reason in DECLINE_REASON_TEXT:
        return DECLINE_REASON_TEXT[reason]
    return RESPONSE_TEXT[response]


class MeetingMessage(CalendarItem):
    """A meeting response stored in a mail folder.

    It keeps a calendar item's storage (item id, ChangeKey version, folder, sync sequence, CleanGlobalObjectId,
    start/end/location of the meeting), so the directory, SyncFolderItems, FindItem restrictions and notifications
    handle it like any other item; ``itemxml.render`` writes it as a t:MeetingResponse.
    """

    __slots__ = ("associated_iid", "is_read", "received_by", "recipients", "recurrence_id", "response_type",
                 "sender")

    def __init__(self, iid: int, mailbox: Mailbox, folder: Folder, *, response: str, sender: Person,
                 recipients: tuple[Person, ...], meeting: CalendarItem, subject: str, body: str | None,
                 body_type: str = "Text", original_start: datetime | None = None,
                 associated_iid: int | None = None) -> None:
        now = datetime.now(UTC)
        start, end = meeting.start, meeting.end
        if original_start is not None and meeting.recurrence is not None:
            start, end = original_start, meeting.occurrence_end(original_start)
        super().__init__(iid, mailbox, folder, start=start, end=end, subject=subject, tz=meeting.tz,
                         goid=meeting.goid, created=now)
        self.response_type = response
        self.sender = sender
        self.recipients = recipients
        self.received_by = mailbox.person
        self.recurrence_id = original_start
        self.associated_iid = associated_iid
        self.is_read = False
        self.item_class = RESPONSE_CLASS[response]
        self.body = body
        self.body_type = body_type
        self.location = meeting.location
        self.organizer = meeting.organizer
        self.meeting_seq = meeting.meeting_seq  # the version of the meeting this message answers
        self.is_meeting = True
        self.my_response = response
        self.reminder = None
        self.free_busy = "Free"


__all__ = ["DECLINE_REASON_TEXT", "RESPONSE_CLASS", "RESPONSE_TEXT", "MeetingMessage", "attendant_text"]
