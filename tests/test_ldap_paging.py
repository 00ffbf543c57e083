"""Paged searches where a size limit bites: OpenLDAP (slapd) refuses to return more than 100 entries to a search
that is not paged, as Active Directory stops at 1,000 (Samba enforces no such limit, so it cannot tell)."""

from __future__ import annotations

from collections.abc import Iterator

import ldap3
import pytest

from gateway.directory.ldap import LdapDirectory, LdapSettings, VerifiedTls
from tests.ldap_server import PASSWORD, SLAPD_BASE, SLAPD_READER, SLAPD_SIZE_LIMIT, Slapd, slapd

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]
PEOPLE = 1234


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with slapd(tmp_path_factory.mktemp("slapd"), PEOPLE) as s:
        yield s


def test_the_size_limit_bites_a_search_that_is_not_paged(server: Slapd) -> None:
    conn = ldap3.Connection(ldap3.Server(server.url, tls=VerifiedTls(str(server.ca), server.server_name)),
                            SLAPD_READER, PASSWORD, raise_exceptions=True)
    conn.open()
    conn.start_tls()
    conn.bind()
    try:
        conn.search(f"ou=People,{SLAPD_BASE}", "(objectClass=inetOrgPerson)", attributes=["mail"])
        assert conn.result["description"] == "sizeLimitExceeded"
        assert len(conn.entries) == SLAPD_SIZE_LIMIT < PEOPLE
    finally:
        conn.unbind()


@pytest.mark.parametrize("page_size", [500, 77])
async def test_every_entry_past_the_size_limit_comes_in_pages(server: Slapd, page_size: int) -> None:
    d = LdapDirectory(LdapSettings(urls=(server.url,), bind=SLAPD_READER, base_dn=SLAPD_BASE, ca_file=str(server.ca),
                                   server_name=server.server_name, page_size=page_size), PASSWORD)
    try:
        before = d.requests
        found = await d.run(lambda conn: d.search(conn, f"ou=People,{SLAPD_BASE}", "(objectClass=inetOrgPerson)",
                                                  ["mail"]))
        people = {e["dn"] for e in found if e["dn"].startswith("uid=p")}
        assert len(found) == len(people) == PEOPLE > SLAPD_SIZE_LIMIT
        searches = d.requests - before - 2  # StartTLS and the bind
        assert searches >= -(-(PEOPLE + 1) // page_size) > 1
    finally:
        await d.close()
