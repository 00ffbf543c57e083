import pytest
from exchangelib import IMPERSONATION, NTLM, Account, Configuration, Credentials
from exchangelib.errors import ErrorImpersonateUserDenied, UnauthorizedError


def test_service_account_reads_room_calendar_over_ntlm(ews):
    room = ews.room("room1@contoso.com")
    assert room.calendar.name == "Calendar"
    assert room.version.api_version == "Exchange2016"


def test_impersonation_outside_scope_is_denied(ews):
    with pytest.raises(ErrorImpersonateUserDenied):
        ews.room("alice@contoso.com").calendar


def test_wrong_password_is_refused(ews):
    cfg = Configuration(service_endpoint=ews.url, credentials=Credentials("CONTOSO\\svc-gateway", "nope"),
                        auth_type=NTLM)
    with pytest.raises(UnauthorizedError):
        Account("room1@contoso.com", config=cfg, access_type=IMPERSONATION, autodiscover=False).calendar
