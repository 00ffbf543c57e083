"""What leaves the building: the field policy, applied before anything reaches the outbox."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from gateway.model import Booking


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    subjects: str = "keep"  # keep, hash, drop
    private_subject: str = "Private"  # what a private meeting's subject becomes
    hide_private_organizer: bool = True
    hide_attendees: bool = False


def apply(b: Booking, policy: PrivacyPolicy) -> Booking:
    if b.sensitivity in ("private", "confidential"):
        return replace(
            b,
            subject=policy.private_subject,
            subject_is_organizer_name=False,
            organizer=None if policy.hide_private_organizer else b.organizer,
            attendees=tuple(a for a in b.attendees if a.kind == "resource"),
        )
    if policy.subjects == "drop":
        b = replace(b, subject=None, subject_is_organizer_name=False)
    elif policy.subjects == "hash" and b.subject is not None:
        digest = hashlib.sha256(b.subject.encode()).hexdigest()[:16]
        b = replace(b, subject=f"sha256:{digest}", subject_is_organizer_name=False)
    if policy.hide_attendees:
        b = replace(b, attendees=tuple(a for a in b.attendees if a.kind == "resource"))
    return b
