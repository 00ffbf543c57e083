"""GetRoomLists, GetRooms and ResolveNames against the simulator, driven by exchangelib over HTTP + NTLM."""

from __future__ import annotations

import pytest
from exchangelib.errors import (
    ErrorNameResolutionNoResults,
    ErrorSchemaValidation,
)
from exchangelib.items import Contact
from exchangelib.properties import Mailbox


def test_room_lists(ews):
    protocol = ews.room().protocol
    lists = list(protocol.get_roomlists())
    assert [(r.name, r.email_address, r.mailbox_type) for r in lists] == [
        ("Annex rooms", "rooms-annex@contoso.com", "PublicDL"),
        ("HQ rooms", "rooms-hq@contoso.com", "PublicDL"),
    ]


def test_rooms_of_a_list(ews):
    protocol = ews.room().protocol
    rooms = list(protocol.get_rooms("rooms-hq@contoso.com"))
    assert [(r.name, r.email_address, r.mailbox_type) for r in rooms] == [
        ("HQ Room 1", "room1@contoso.com", "Mailbox"),
        ("HQ Room 3", "room3@contoso.com", "Mailbox"),
        ("HQ Room 5", "room5@contoso.com", "Mailbox"),
    ]
    annex = list(protocol.get_rooms("ROOMS-ANNEX@contoso.com"))  # addresses are case-insensitive
    assert [r.email_address for r in annex] == ["room2@contoso.com", "room4@contoso.com"]


@pytest.mark.parametrize("address", ["rooms-nowhere@contoso.com", "alice@contoso.com"])
def test_rooms_of_something_that_is_not_a_room_list(ews, address):
    with pytest.raises(ErrorNameResolutionNoResults):
        list(ews.room().protocol.get_rooms(address))


def _protocol(ews):
    protocol = ews.room().protocol
    # exchangelib 5.6: ResolveNames has no minimum server version, so it never triggers version discovery and
    # fails with AttributeError as the first call on a fresh protocol. Discover the version first.
    assert protocol.version.api_version == "Exchange2016"
    return protocol


def _one(protocol, name: str, **kw):
    return protocol.resolve_names([name], **kw)


@pytest.mark.parametrize("entry", ["alice@contoso.com", "SMTP:Alice@Contoso.com", "Alice Anders", "alic",
                                   "Anders Alice", "Anders, Alice"])
def test_resolve_a_person(ews, entry):
    (mb,) = _one(_protocol(ews), entry)
    assert isinstance(mb, Mailbox)
    assert (mb.name, mb.email_address, mb.routing_type, mb.mailbox_type) == (
        "Alice Anders", "alice@contoso.com", "SMTP", "Mailbox")


def test_resolve_a_room_and_a_room_list(ews):
    protocol = _protocol(ews)
    (room,) = _one(protocol, "room3")
    assert (room.name, room.email_address) == ("HQ Room 3", "room3@contoso.com")
    (rl,) = _one(protocol, "rooms-annex@contoso.com")
    assert (rl.name, rl.mailbox_type) == ("Annex rooms", "PublicDL")


def test_ambiguous_name_returns_every_candidate(ews):
    # Exchange answers with a Warning (ErrorNameResolutionMultipleResults); exchangelib logs it and returns them.
    found = _one(_protocol(ews), "hq")
    assert [(m.name, m.email_address) for m in found] == [
        ("HQ Room 1", "room1@contoso.com"),
        ("HQ Room 3", "room3@contoso.com"),
        ("HQ Room 5", "room5@contoso.com"),
        ("HQ rooms", "rooms-hq@contoso.com"),
    ]
    # every person in the standard org is an Anders: a surname matches them all
    people = _one(_protocol(ews), "anders")
    assert [m.email_address for m in people] == [f"{n}@contoso.com" for n in ("alice", "bob", "carol", "dave",
                                                                               "erin")]


def test_no_match(ews):
    (result,) = _one(_protocol(ews), "zebra")
    assert isinstance(result, ErrorNameResolutionNoResults)


def test_contacts_scope_searches_no_directory(ews):
    (result,) = _one(_protocol(ews), "alice@contoso.com", search_scope="Contacts")
    assert isinstance(result, ErrorNameResolutionNoResults)


def test_full_contact_data(ews):
    ((mb, contact),) = _one(_protocol(ews), "bob", return_full_contact_data=True)
    assert mb.email_address == "bob@contoso.com"
    assert isinstance(contact, Contact)
    assert (contact.display_name, contact.given_name, contact.surname, contact.contact_source) == (
        "Bob Anders", "Bob", "Anders", "ActiveDirectory")
    assert [(e.label, e.email) for e in contact.email_addresses] == [("EmailAddress1", "SMTP:bob@contoso.com")]


def test_exchangelib_sends_several_names_in_one_request(ews):
    # ResolveNames takes exactly one UnresolvedEntry; exchangelib packs a list into one request, which the
    # schema refuses. Resolve names one at a time.
    with pytest.raises(ErrorSchemaValidation):
        _protocol(ews).resolve_names(["alice", "bob"])
