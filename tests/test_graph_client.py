"""The Graph client and source against a small Graph and Entra ID in this process, over HTTPS, with msal for real:
tokens (a secret, a certificate), throttling, the per-mailbox limit, an application access policy, TLS, and the
delta token's expiry. The simulator's Graph side (tests/test_graph_*.py with graph_sim) covers the rest end to end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import (
    AuthError,
    HttpError,
    ImpersonationDenied,
    MailboxNotFound,
    NotFound,
    SyncStateInvalid,
    TlsError,
)
from gateway.sources.graph.auth import TokenSource
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.kind import GraphCredentials
from gateway.sources.graph.settings import GraphSettings
from gateway.sources.graph.source import GraphSource
from tests.graph_stub import CLIENT, SECRET, TENANT, Stub, rsa_certificate, serve_stub, settings

pytestmark = pytest.mark.unit

ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
RAOP = ("Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.")


@pytest.fixture
async def stub(pki: Any) -> AsyncIterator[Stub]:
    async for s in serve_stub(pki):
        yield s


@pytest.fixture
async def client(stub: Stub, pki: Any) -> AsyncIterator[GraphClient]:
    c = GraphClient(settings(stub, pki), TokenSource(settings(stub, pki), SECRET))
    yield c
    await c.close()


# -- tokens ----------------------------------------------------------------------------------------------------------
async def test_a_token_is_asked_for_once_and_reused(stub: Stub, client: GraphClient) -> None:
    for _ in range(4):
        await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    assert stub.token_requests == 1 and len(stub.seen) == 4
    client.tokens.forget()  # and when a new one is needed while many requests wait, it is asked for once too
    await asyncio.gather(*(client.call("GET", client.user(room) + "/calendar", mailbox=room, operation="getCalendar")
                           for room in (ROOM1, ROOM2) for _ in range(6)))
    assert stub.token_requests == 2 and len(stub.seen) == 16


async def test_a_certificate_signs_the_assertion_and_tells_its_end(stub: Stub, pki: Any) -> None:
    pem, cert = rsa_certificate(days=30)
    stub.certificate = cert
    s = settings(stub, pki, credential="certificate")
    tokens = TokenSource(s, pem)
    c = GraphClient(s, tokens)
    try:
        await c.call("GET", c.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    finally:
        await c.close()
    assert stub.token_requests == 1 and len(stub.seen) == 1
    [expiry] = await GraphCredentials("online", s, tokens).credential_expiry()
    assert (expiry.credential, expiry.kind, expiry.expires_at) == ("source:online", "certificate",
                                                                   cert.not_valid_after_utc)


async def test_a_token_graph_refuses_before_its_time_is_replaced_once(stub: Stub, client: GraphClient) -> None:
    await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    stub.tokens.clear()  # revoked: Graph answers 401 to it, though msal's cache still holds it
    await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    assert stub.token_requests == 2


async def test_an_expired_secret_is_auth_required_and_logged_once(stub: Stub, client: GraphClient) -> None:
    stub.secret_expired = True
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(AuthError) as e:
                await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
            assert e.value.key == "auth_required" and "expired" in str(e.value)
            assert "gateway credentials set" in e.value.remedy and SECRET not in str(e.value)
    assert [entry["event"] for entry in logs].count("graph.auth_refused") == 1
    assert SECRET not in repr(logs)
    assert stub.token_requests == 1 and stub.seen == []  # one failed logon; the gate holds the other rooms


# -- limits and errors -------------------------------------------------------------------------------------------
async def test_throttling_is_waited_out_for_its_mailbox_only(stub: Stub, client: GraphClient) -> None:
    path = f"/users/{ROOM1}/calendar"
    stub.answers[path] = [(429, {"error": {"code": "ApplicationThrottled", "message": "Application is over its "
                                           "MailboxConcurrency limit."}}, {"Retry-After": "1"})]
    await client.call("GET", client.user(ROOM2) + "/calendar", mailbox=ROOM2, operation="getCalendar")  # a token

    async def room2_later() -> None:
        await asyncio.sleep(0.1)
        await client.call("GET", client.user(ROOM2) + "/calendar", mailbox=ROOM2, operation="getCalendar")
    await asyncio.gather(client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar"),
                         room2_later())
    room1 = [t for t, _, p in stub.seen if p == path]
    room2 = [t for t, _, p in stub.seen if p == f"/users/{ROOM2}/calendar"]
    assert len(room1) == 2 and room1[1] - room1[0] >= 1.0  # Retry-After honoured
    assert room2[1] < room1[1]  # the other mailbox did not wait


async def test_at_most_three_requests_are_in_flight_per_mailbox(stub: Stub, client: GraphClient) -> None:
    await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    stub.delay = 0.2
    await asyncio.gather(*(client.call("GET", client.user(room) + "/calendar", mailbox=room, operation="getCalendar")
                           for room in (ROOM1, ROOM2) for _ in range(8)))
    assert stub.most == {ROOM1: 3, ROOM2: 3}


async def test_an_access_policy_is_the_rooms_state_with_its_remedy_and_is_not_retried(
        stub: Stub, client: GraphClient) -> None:
    path = f"/users/{ROOM1}/calendar"
    stub.answers[path] = [(403, {"error": {"code": "ErrorAccessDenied", "message": RAOP}}, {})]
    with pytest.raises(ImpersonationDenied) as e:
        await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    assert e.value.key == "impersonation_denied" and "access policy" in str(e.value) and ROOM1 in str(e.value)
    assert "New-ApplicationAccessPolicy" in e.value.remedy and "Test-ApplicationAccessPolicy" in e.value.remedy
    assert [p for _, _, p in stub.seen] == [path]
    await client.call("GET", client.user(ROOM2) + "/calendar", mailbox=ROOM2, operation="getCalendar")  # unaffected


async def test_an_unknown_mailbox_is_not_found(stub: Stub, client: GraphClient) -> None:
    invalid = {"error": {"code": "ErrorInvalidUser", "message": "The requested user 'room1@contoso.com' is invalid."}}
    stub.answers[f"/users/{ROOM1}/calendar"] = [(404, invalid, {})]
    with pytest.raises(MailboxNotFound):
        await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")


@pytest.mark.parametrize("body", [
    b'{"value": [{"id": "AAMk', b"[" * 100_000 + b"]" * 100_000, b'{"subject": "caf\xe9"}', b"<html>proxy</html>"],
    ids=["cut off", "nested 100,000 deep", "not UTF-8", "not JSON"])
async def test_an_answer_that_is_not_json_is_an_http_error_that_names_the_fix(
        stub: Stub, client: GraphClient, body: bytes) -> None:
    stub.answers[f"/users/{ROOM1}/calendar"] = [(200, body, {})]
    with pytest.raises(HttpError, match="something other than JSON") as caught:
        await client.call("GET", client.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    assert caught.value.remedy == "check graph_url"


async def test_a_server_certificate_from_another_ca_is_a_tls_error(stub: Stub, pki: Any) -> None:
    s = GraphSettings(tenant_id=TENANT, client_id=CLIENT, credential="client_secret", authority_host=stub.base,
                      graph_url=f"{stub.base}/v1.0", ca_bundle=str(pki.other_ca_file), timeout=5, max_attempts=1)
    c = GraphClient(s, TokenSource(s, SECRET))
    try:
        with pytest.raises(TlsError):
            await c.call("GET", c.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    finally:
        await c.close()
    assert stub.token_requests == 0


# -- the delta token ---------------------------------------------------------------------------------------------
async def test_an_expired_or_foreign_or_outgrown_delta_token_is_sync_state_invalid(
        stub: Stub, client: GraphClient) -> None:
    now = [dt.datetime.now(dt.UTC)]
    source = GraphSource(client.settings, client, now=lambda: now[0])
    delta = f"/users/{ROOM1}/calendarView/delta"
    stub.answers[delta] = [(200, {"value": [], "@odata.deltaLink": f"{stub.base}/v1.0{delta}?$deltatoken=abc"}, {}),
                           (410, {"error": {"code": "SyncStateNotFound", "message": "The sync state generation is "
                                            "not found."}}, {})]
    first = await source.changes(ROOM1, None)
    assert not first.more and first.sync_state.endswith("$deltatoken=abc")
    with pytest.raises(SyncStateInvalid):
        await source.changes(ROOM1, first.sync_state)
    with pytest.raises(SyncStateInvalid):  # another room's token: refused without a request
        await source.changes(ROOM2, first.sync_state)
    now[0] += dt.timedelta(days=client.settings.slack_days + 1)  # the sync window rolled past the token's
    requests = len(stub.seen)
    with pytest.raises(SyncStateInvalid):
        await source.changes(ROOM1, first.sync_state)
    assert len(stub.seen) == requests


def test_the_delta_window_is_the_configured_sync_window(tmp_path: Any) -> None:
    from gateway.app import options_from_config
    from gateway.config import load_config

    path = tmp_path / "gateway.yaml"
    path.write_text(f"""\
sources:
  - name: online
    kind: graph
    tenant_id: {TENANT}
    client_id: {CLIENT}
    client_secret_ref: env:GRAPH_SECRET
    mailboxes: [{ROOM1}]
rooms:
  days_back: 3
  days_ahead: 600
""")
    env = {"GRAPH_SECRET": SECRET}
    [spec] = options_from_config(load_config(path, env=env), env).sources
    assert isinstance(spec.settings, GraphSettings) and spec.secret == SECRET
    assert (spec.settings.days_back, spec.settings.days_ahead) == (3, 600)
    now = dt.datetime(2030, 1, 7, 8, tzinfo=dt.UTC)
    window = GraphSource(spec.settings, None, now=lambda: now).delta_window()  # type: ignore[arg-type]
    assert window.start == dt.datetime(2030, 1, 4, tzinfo=dt.UTC)
    assert window.end == dt.datetime(2030, 1, 7, tzinfo=dt.UTC) + dt.timedelta(days=600 + spec.settings.slack_days)


async def test_a_client_secret_ends_when_the_configuration_says_or_cannot_be_known(stub: Stub, pki: Any) -> None:
    dated = settings(stub, pki, secret_expires=dt.date(2027, 6, 30))
    [expiry] = await GraphCredentials("online", dated, TokenSource(dated, SECRET)).credential_expiry()
    assert (expiry.kind, expiry.expires_at, expiry.known) == ("client_secret", dt.datetime(2027, 6, 30, tzinfo=dt.UTC),
                                                              True)
    undated = settings(stub, pki)
    [unknown] = await GraphCredentials("online", undated, TokenSource(undated, SECRET)).credential_expiry()
    assert not unknown.known and "secret_expires" in unknown.detail and SECRET not in repr(unknown)


async def test_an_unusable_certificate_from_the_vault_is_said_and_the_old_one_kept(stub: Stub, pki: Any) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.ports import FeedSettings, SourceSpec
    from gateway.sources.graph.kind import GraphKind

    pem, cert = rsa_certificate()
    stub.certificate = cert
    s = settings(stub, pki, credential="certificate")
    opened = GraphKind(CollectorRegistry()).open(SourceSpec("online", "graph", s, pem, rooms=(ROOM1,)),
                                                FeedSettings(mode="poll"))
    try:
        assert opened.set_secret is not None
        with capture_logs() as logs:
            opened.set_secret("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        assert [e["event"] for e in logs] == ["graph.credentials_unusable"] and "PEM" in logs[0]["reason"]
        await opened.calendar.verify(ROOM1)  # signed with the certificate it had
        assert stub.token_requests == 1
    finally:
        await opened.close()


async def test_a_batch_sends_a_throttled_member_again_and_maps_each_answer(stub: Stub, client: GraphClient) -> None:
    gets = [f"/users/{ROOM1}/events/{k}" for k in ("a", "b", "c")]
    stub.answers["/$batch"] = [
        (200, {"responses": [{"id": "0", "status": 200, "body": {"id": "a"}},
                             {"id": "1", "status": 429, "headers": {"Retry-After": "0"},
                              "body": {"error": {"code": "ApplicationThrottled"}}},
                             {"id": "2", "status": 404, "body": {"error": {"code": "ErrorItemNotFound"}}}]}, {}),
        (200, {"responses": [{"id": "1", "status": 200, "body": {"id": "b"}}]}, {})]
    a, b, c = await client.batch(gets, mailbox=ROOM1, operation="getEvent")
    assert [x.body["id"] for x in (a, b) if not isinstance(x, Exception)] == ["a", "b"]
    assert isinstance(c, NotFound) and not isinstance(c, MailboxNotFound)
    assert [p for _, _, p in stub.seen] == ["/$batch", "/$batch"]
