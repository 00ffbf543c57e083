"""The error tree (gateway/errors.py): the classes that code decides by, their stable keys (logs, metrics, room
states and API bodies expose them), what a person reads, which failures every room shares, and the room state each
failure puts a room in. The classes decide; a key alone decides nothing."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests
from exchangelib import errors as xerr

from gateway.errors import (
    AccessDenied,
    AccountLocked,
    AuthError,
    ConfigError,
    GatewayError,
    HttpError,
    ImpersonationDenied,
    MailboxNotFound,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    RequestFailed,
    RoomIsOrganizer,
    RoomUnknown,
    SyncStateInvalid,
    Throttled,
    TlsError,
    TransientError,
    Unavailable,
    UnknownHost,
    Unreachable,
    is_shared,
)
from gateway.model import RoomState
from gateway.relay.enroll import AlreadyEnrolled
from gateway.sources.ews.source import HttpStatusError, translate
from gateway.sync.coordinator import room_state

ROOM = "room1@contoso.com"


@pytest.mark.parametrize(("cls", "parent", "key"), [
    (AccountLocked, AuthError, "account_locked"),
    (AccessDenied, AuthError, "auth_required"),
    (ImpersonationDenied, AuthError, "impersonation_denied"),
    (MailboxNotFound, NotFound, "mailbox_not_found"),
    (RoomUnknown, NotFound, "room_unknown"),
    (RequestFailed, Unavailable, "exchange_error"),
    (Unreachable, Unavailable, "cannot_connect"),
    (UnknownHost, Unreachable, "unknown_host"),
    (TlsError, Unreachable, "tls_error"),
    (HttpError, Unreachable, "http_error"),
    (RoomIsOrganizer, PreconditionFailed, "room_is_organizer"),
    (SyncStateInvalid, PreconditionFailed, "sync_state_invalid"),
    (AlreadyEnrolled, ConfigError, "already_enrolled"),
])
def test_each_subclass_keeps_its_key_under_its_parent(cls, parent, key):
    assert cls.__bases__ == (parent,)
    e = cls("what happened")
    assert e.key == key and isinstance(e, GatewayError)


def test_the_message_says_the_remedy_and_a_raise_site_may_word_its_own():
    e = MailboxNotFound(f"Exchange has no mailbox {ROOM}")
    assert e.remedy and str(e) == f"Exchange has no mailbox {ROOM} ({e.remedy})"
    own = AccountLocked("locked out", remedy="unlock it in Active Directory")
    assert str(own) == "locked out (unlock it in Active Directory)" and own.key == "account_locked"
    assert str(Unreachable("no route", host="mail:443")).startswith("no route (")  # its class's remedy
    assert str(ProtocolError("bad")) == "bad"  # no remedy, nothing appended


@pytest.mark.parametrize(("error", "shared"), [
    (AuthError("the account's logon was refused"), True),
    (AccountLocked("locked out"), True),
    (AccessDenied("no right on this mailbox"), False),
    (ImpersonationDenied("may not impersonate"), False),
    (Throttled("busy", back_off=5.0), True),
    (Unreachable("refused"), True),
    (UnknownHost("no such host"), True),
    (TlsError("certificate verify failed"), True),
    (HttpError("HTTP 404"), True),
    (Unavailable("reset"), False),
    (RequestFailed("ErrorMailboxStoreUnavailable"), False),
    (MailboxNotFound("no mailbox"), False),
])
def test_shared_failures_are_told_by_class(error, shared):
    assert is_shared(error) is shared


@pytest.mark.parametrize(("error", "state"), [
    (AuthError("refused"), RoomState.AUTH_REQUIRED),
    (AccessDenied("no right"), RoomState.AUTH_REQUIRED),
    (AccountLocked("locked out"), RoomState.ACCOUNT_LOCKED),
    (ImpersonationDenied("may not impersonate"), RoomState.IMPERSONATION_DENIED),
    (MailboxNotFound("no mailbox"), RoomState.MAILBOX_NOT_FOUND),
    (NotFound("no such item"), RoomState.EXCHANGE_ERROR),
    (RoomUnknown("no source lists it"), RoomState.EXCHANGE_ERROR),
    (Throttled("busy", back_off=5.0), RoomState.THROTTLED),
    (Unreachable("refused"), RoomState.CANNOT_CONNECT),
    (UnknownHost("no such host"), RoomState.UNKNOWN_HOST),
    (TlsError("certificate verify failed"), RoomState.TLS_ERROR),
    (HttpError("HTTP 404"), RoomState.HTTP_ERROR),
    (Unavailable("did not answer"), RoomState.CANNOT_CONNECT),
    (RequestFailed("ErrorMailboxStoreUnavailable"), RoomState.EXCHANGE_ERROR),
    (TransientError("odd answer", key="exchange_error"), RoomState.EXCHANGE_ERROR),
    (SyncStateInvalid("rejected"), RoomState.EXCHANGE_ERROR),
    (ProtocolError("malformed"), RoomState.EXCHANGE_ERROR),
    (ConfigError("wrong"), RoomState.EXCHANGE_ERROR),
])
def test_the_room_state_of_a_failure_follows_its_class(error, state):
    assert room_state(error) is state


def test_a_key_alone_decides_no_room_state():
    assert room_state(GatewayError("x", key="mailbox_not_found")) is RoomState.EXCHANGE_ERROR
    assert room_state(Unreachable("x", key="tls_error")) is RoomState.CANNOT_CONNECT


# -- the EWS adapter raises the classes the core decides by ----------------------------------------------------
@pytest.mark.parametrize(("raised", "cls", "key"), [
    (xerr.ErrorNonExistentMailbox("no mailbox"), MailboxNotFound, "mailbox_not_found"),
    (xerr.UnauthorizedError("the account is locked out"), AccountLocked, "account_locked"),
    (xerr.UnauthorizedError("401"), AuthError, "invalid_auth"),
    (xerr.ErrorAccessDenied("no right"), AccessDenied, "auth_required"),
    (xerr.ErrorMailboxStoreUnavailable("store down"), RequestFailed, "exchange_error"),
    (requests.exceptions.ChunkedEncodingError("cut short"), RequestFailed, "exchange_error"),
    (xerr.MalformedResponseError("not XML"), HttpError, "http_error"),
    (HttpStatusError(404, "Not Found", "https://mail.contoso.com/ews/exchange.svc"), HttpError, "http_error"),
    (requests.exceptions.ConnectionError("refused"), Unreachable, "cannot_connect"),
    (socket.gaierror(-2, "Name or service not known"), UnknownHost, "unknown_host"),
    (ssl.SSLError(1, "certificate verify failed"), TlsError, "tls_error"),
])
def test_ews_failures_are_translated_into_the_subclasses(raised, cls, key):
    e = translate(raised, room=ROOM, endpoint="https://mail.contoso.com/EWS/Exchange.asmx")
    assert type(e) is cls and e.key == key
