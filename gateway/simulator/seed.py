"""A standard simulated organisation: service accounts, people, rooms and room lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.simulator.mailboxes import Directory

SERVICE_ACCOUNT = "svc-gateway"
SERVICE_PASSWORD = "Gateway-Service-1!"  # a simulator-only password, printed on start-up on purpose
ORGANIZER_ACCOUNT = "svc-organizers"  # impersonation over everyone: scenario (a) of the write semantics


@dataclass
class Org:
    service_account: str
    service_password: str
    users: list[tuple[str, str]] = field(default_factory=list)  # (email, password)
    rooms: list[str] = field(default_factory=list)
    room_lists: list[str] = field(default_factory=list)


FIRST = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
         "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yvonne"]
LAST = ["Anders", "Berg", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hansen", "Ito", "Jensen", "Khan", "Larsen",
        "Meyer", "Nowak", "Olsen", "Patel", "Quinn", "Rossi", "Schmidt", "Tanaka"]
BUILDINGS = ["HQ", "Annex"]


def standard_org(directory: Directory, *, rooms: int = 5, users: int = 5) -> Org:
    """Create a service account with ApplicationImpersonation scoped to rooms, people, rooms and room lists."""
    d = directory
    dom = d.domain
    d.add_mailbox(f"{SERVICE_ACCOUNT}@{dom}", "Gateway Service", "user", password=SERVICE_PASSWORD,
                  impersonation="rooms")
    d.add_mailbox(f"{ORGANIZER_ACCOUNT}@{dom}", "Gateway Organizer Service", "user", password=SERVICE_PASSWORD,
                  impersonation="all")
    org = Org(f"{d.netbios}\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD)
    for i in range(users):
        first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
        local = f"{first.lower()}" if i < len(FIRST) else f"{first.lower()}.{last.lower()}{i}"
        password = f"Pw-{local}-1!"
        d.add_mailbox(f"{local}@{dom}", f"{first} {last}", "user", password=password)
        org.users.append((f"{local}@{dom}", password))
    per_list: dict[str, list[str]] = {}
    for i in range(rooms):
        building = BUILDINGS[i % len(BUILDINGS)]
        smtp = f"room{i + 1}@{dom}"
        d.add_mailbox(smtp, f"{building} Room {i + 1}", "room", capacity=4 + (i % 5) * 4)
        org.rooms.append(smtp)
        per_list.setdefault(building, []).append(smtp)
    for building, members in per_list.items():
        smtp = f"rooms-{building.lower()}@{dom}"
        d.add_room_list(smtp, f"{building} rooms", members)
        org.room_lists.append(smtp)
    return org
