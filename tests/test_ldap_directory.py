"""The LDAP directory against a real Active Directory (Samba's AD DC, started by tests/ldap_server.py): how it
connects (TLS required, the certificate verified, three ways to name the bind account, failover), what it says
about service accounts (AccountLookup), and the Directory port's answers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.errors import AuthError, NotFound, TlsError, Unreachable
from gateway.ports import AccountLookup, Directory, RoomInfo, RoomList
from tests.ldap_server import (
    BASE,
    BIND_DN,
    DOMAIN,
    EXPIRING,
    LOCKABLE,
    MAIL,
    NEVER,
    PASSWORD,
    SERVER_NAME,
    SERVICE_OU,
    SambaDC,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]


def settings(dc: SambaDC, **kw: object) -> LdapSettings:
    values: dict[str, object] = {"urls": (dc.ldaps_url,), "bind": BIND_DN, "base_dn": BASE, "ca_file": str(dc.ca),
                                 "server_name": SERVER_NAME}
    values.update(kw)
    return LdapSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def directory(samba: SambaDC) -> AsyncIterator[LdapDirectory]:
    d = LdapDirectory(settings(samba), PASSWORD)
    yield d
    await d.close()


# -- connecting ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bind", [BIND_DN, f"svc-ldap@{MAIL}", f"{DOMAIN}\\svc-ldap"], ids=["dn", "upn", "domain"])
@pytest.mark.parametrize("tls", ["ldaps", "starttls"])
async def test_binds_by_dn_upn_and_domain_user_over_ldaps_and_starttls(samba: SambaDC, bind: str, tls: str) -> None:
    url = samba.ldaps_url if tls == "ldaps" else samba.ldap_url
    d = LdapDirectory(settings(samba, urls=(url,), bind=bind), PASSWORD)
    try:
        assert [r.email for r in await d.room_lists()] == [f"rooms-hq@{MAIL}"]
        assert d.binds == 1
    finally:
        await d.close()


async def test_a_bind_without_tls_is_refused_by_the_directory_and_named_as_such(samba: SambaDC) -> None:
    d = LdapDirectory(settings(samba, urls=(samba.ldap_url,), start_tls=False), PASSWORD)
    try:
        with pytest.raises(AuthError) as e:
            await d.room_lists()
        assert e.value.key == "tls_required"
        assert "without TLS" in str(e.value) and "ldaps://" in e.value.remedy
    finally:
        await d.close()


@pytest.mark.parametrize("url", ["ldaps", "starttls"])
async def test_a_certificate_from_an_untrusted_ca_is_refused(samba: SambaDC, tmp_path: Path, url: str) -> None:
    ca = tmp_path / "other-ca.pem"
    ca.write_text(_self_signed_ca())  # a CA that did not sign the DC's certificate
    d = LdapDirectory(settings(samba, urls=(samba.ldaps_url if url == "ldaps" else samba.ldap_url,),
                               ca_file=str(ca)), PASSWORD)
    try:
        with pytest.raises(TlsError) as e:
            await d.room_lists()
        assert "ca_bundle" in e.value.remedy and d.binds == 0
    finally:
        await d.close()


async def test_a_certificate_for_another_name_is_refused(samba: SambaDC) -> None:
    d = LdapDirectory(settings(samba, server_name="dc9.elsewhere.test"), PASSWORD)
    try:
        with pytest.raises(TlsError):
            await d.room_lists()
    finally:
        await d.close()


def _self_signed_ca() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Another CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


async def test_a_wrong_password_costs_one_bind_then_backs_off(samba: SambaDC) -> None:
    d = LdapDirectory(settings(samba, bind=f"CN={NEVER},{SERVICE_OU}"), "not-the-password")
    try:
        results = await asyncio.gather(*(d.room(f"room{i}@{MAIL}") for i in range(1, 9)),
                                       d.room_lists(), d.people("a"), return_exceptions=True)
        assert all(isinstance(r, AuthError) and r.key == "invalid_auth" for r in results), results
        for _ in range(5):  # later requests are answered from the refusal, without a bind
            with pytest.raises(AuthError):
                await d.room_lists()
        assert d.binds == 1
        admin = LdapDirectory(settings(samba), PASSWORD)
        status = await admin.account(f"CN={NEVER},{SERVICE_OU}")
        await admin.close()
        assert status.bad_password_count == 1  # what the DC counted: one failed logon
        d.set_password(PASSWORD)  # new credentials are tried at once
        assert await d.room_lists()
        assert d.binds == 2
    finally:
        await d.close()


async def test_a_dc_that_cannot_be_reached_fails_over_to_the_next(samba: SambaDC) -> None:
    dead = samba.forward(636)
    dead.stop()  # a port where nothing answers any more
    second = samba.forward(636)
    d = LdapDirectory(settings(samba, urls=(f"ldaps://127.0.0.1:{dead.port}", f"ldaps://127.0.0.1:{second.port}",
                                            samba.ldaps_url), timeout_seconds=5), PASSWORD)
    try:
        assert await d.room_lists()
        second.stop()  # the DC in use goes down: the connection breaks, the next request goes to the third
        assert [r.email for r in await d.room_lists()] == [f"rooms-hq@{MAIL}"]
        assert d.binds == 2
    finally:
        await d.close()


async def test_no_dc_reachable_is_named_with_every_url(samba: SambaDC) -> None:
    # Two ports held bound but not listening: refused, and no other process can take them while the test runs
    # (a stopped forwarder's freed port was once taken by another test's server on this busy machine).
    held = [socket.socket(), socket.socket()]
    for s in held:
        s.bind(("127.0.0.1", 0))
    a, b = (s.getsockname()[1] for s in held)
    d = LdapDirectory(settings(samba, urls=(f"ldaps://127.0.0.1:{a}", f"ldaps://127.0.0.1:{b}"),
                               timeout_seconds=3), PASSWORD)
    try:
        with pytest.raises(Unreachable) as e:
            await d.room_lists()
        assert str(a) in str(e.value) and str(b) in str(e.value)
    finally:
        await d.close()
        for s in held:
            s.close()


# -- AccountLookup ------------------------------------------------------------------------------------------------
async def test_an_account_whose_password_expires_soon(directory: AccountLookup) -> None:
    status = await directory.account(f"{DOMAIN}\\{EXPIRING}")
    assert status.password_expires_at is not None
    left = status.password_expires_at - datetime.now(UTC)
    assert timedelta(days=4) < left <= timedelta(days=5, minutes=5)  # its 5-day policy, set at the session's start
    assert not status.locked_out and not status.disabled


@pytest.mark.parametrize("name", [f"{NEVER}@{MAIL}", f"CN={NEVER},{SERVICE_OU}", f"{DOMAIN}\\{NEVER}"])
async def test_an_account_whose_password_never_expires(directory: AccountLookup, name: str) -> None:
    status = await directory.account(name)
    assert status.password_expires_at is None and status.name == name
    assert not status.locked_out and not status.disabled


async def test_a_disabled_account_and_an_unknown_one(directory: AccountLookup) -> None:
    assert (await directory.account(f"carol@{MAIL}")).disabled
    with pytest.raises(NotFound) as e:
        await directory.account(f"{DOMAIN}\\nobody")
    assert e.value.key == "account_not_found"


async def test_an_account_locked_out_after_bad_passwords(samba: SambaDC, directory: AccountLookup) -> None:
    name = f"CN={LOCKABLE},{SERVICE_OU}"
    assert not (await directory.account(name)).locked_out
    samba.lock_out(name)  # its policy locks it after 3
    status = await directory.account(name)
    assert status.locked_out and status.bad_password_count >= 3
    # and binding as it is refused as locked, with the remedy
    d = LdapDirectory(settings(samba, bind=name), PASSWORD)
    try:
        with pytest.raises(AuthError) as e:
            await d.room_lists()
        assert e.value.key == "account_locked", e.value
    finally:
        await d.close()
        samba.unlock(name)


# -- Directory port -----------------------------------------------------------------------------------------------
async def test_room_lists_rooms_and_people(directory: Directory) -> None:
    assert await directory.room_lists() == [RoomList(f"rooms-hq@{MAIL}", "Rooms HQ")]
    assert await directory.rooms(f"Rooms-HQ@{MAIL}") == [RoomInfo(f"room1@{MAIL}", "HQ Room 1", 8),
                                                          RoomInfo(f"room2@{MAIL}", "HQ Room 2", 4)]
    with pytest.raises(NotFound) as e:
        await directory.rooms(f"alice@{MAIL}")
    assert e.value.key == "room_list_not_found"
    assert await directory.room(f"ROOM3@{MAIL}") == RoomInfo(f"room3@{MAIL}", "Annex Room 3", 12)
    for not_a_room in (f"alice@{MAIL}", f"beamer1@{MAIL}", f"nobody@{MAIL}"):
        with pytest.raises(NotFound) as e:
            await directory.room(not_a_room)
        assert e.value.key == "mailbox_not_found"
    assert [(p.email, p.name) for p in await directory.people("ali")] == [(f"alice@{MAIL}", "Alice Anders")]
    assert [p.email for p in await directory.people("HQ")] == []  # rooms are not people
    assert [p.email for p in await directory.people("Berg")] == [f"bob@{MAIL}"]

