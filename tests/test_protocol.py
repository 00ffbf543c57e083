"""The HTTP/SOAP face of the simulator: authentication, versions, hostile input, throttling and injected faults."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import requests
from exchangelib import IMPERSONATION, NTLM, Account, Configuration, Credentials, EWSDateTime
from exchangelib.errors import ErrorServerBusy
from exchangelib.protocol import BaseProtocol
from lxml import etree

from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from tests.conftest import TZ

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ENS = "http://schemas.microsoft.com/exchange/services/2006/errors"
BASIC = (f"CONTOSO\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD)


def soap(body: str, version: str = "Exchange2016", header: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<s:Envelope xmlns:s="{SOAP}" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
        'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">'
        f'<s:Header><t:RequestServerVersion Version="{version}"/>{header}</s:Header>'
        f"<s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


GET_CALENDAR = (
    '<m:GetFolder><m:FolderShape><t:BaseShape>Default</t:BaseShape></m:FolderShape>'
    '<m:FolderIds><t:DistinguishedFolderId Id="calendar"/></m:FolderIds></m:GetFolder>'
)
IMPERSONATE_ROOM1 = (
    "<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>room1@contoso.com"
    "</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"
)


def post(url: str, data: bytes, auth: tuple[str, str] | None = BASIC, **headers: str) -> requests.Response:
    hdrs = {"Content-Type": "text/xml; charset=utf-8", **headers}
    return requests.post(url, data=data, auth=auth, headers=hdrs, timeout=10)


def fault_code(resp: requests.Response) -> str:
    root = etree.fromstring(resp.content)
    code = root.find(f".//{{{ENS}}}ResponseCode")
    assert code is not None, resp.text
    return code.text or ""


def response_code(resp: requests.Response) -> str:
    root = etree.fromstring(resp.content)
    code = root.find(".//{http://schemas.microsoft.com/exchange/services/2006/messages}ResponseCode")
    assert code is not None, resp.text
    return code.text or ""


def test_basic_auth_get_folder_with_impersonation(ews):
    resp = post(ews.url, soap(GET_CALENDAR, header=IMPERSONATE_ROOM1))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/xml")
    assert response_code(resp) == "NoError"
    root = etree.fromstring(resp.content)
    info = root.find(".//{http://schemas.microsoft.com/exchange/services/2006/types}ServerVersionInfo")
    assert info is not None and info.get("MajorVersion") == "15" and info.get("MinorVersion") == "1"


def test_unauthenticated_request_gets_the_401_challenge(ews):
    resp = post(ews.url, soap(GET_CALENDAR), auth=None)
    assert resp.status_code == 401
    offered = resp.raw.headers.getlist("WWW-Authenticate")
    assert "NTLM" in offered and "Negotiate" in offered and any(o.startswith("Basic") for o in offered)


def test_wrong_basic_password_is_refused(ews):
    assert post(ews.url, soap(GET_CALENDAR), auth=(BASIC[0], "wrong")).status_code == 401


def test_path_is_case_insensitive_and_other_paths_404(ews):
    assert post(ews.url.replace("/EWS/Exchange.asmx", "/ews/EXCHANGE.ASMX"), soap(GET_CALENDAR)).status_code == 200
    assert post(ews.url.replace("/EWS/Exchange.asmx", "/owa/"), soap(GET_CALENDAR)).status_code == 404


@pytest.mark.parametrize("version", ["Exchange2013", "Exchange2013_SP1", "Exchange2016"])
def test_supported_versions_are_honoured(ews, version):
    resp = post(ews.url, soap(GET_CALENDAR, version=version))
    assert response_code(resp) == "NoError"


def test_unknown_version_is_refused(ews):
    resp = post(ews.url, soap(GET_CALENDAR, version="V2016_10_10"))
    assert resp.status_code == 500
    assert fault_code(resp) == "ErrorInvalidServerVersion"


def test_schema_violation_gets_error_schema_validation(ews):
    bad = GET_CALENDAR.replace("<t:BaseShape>Default</t:BaseShape>", "<t:BaseShape>Everything</t:BaseShape>")
    resp = post(ews.url, soap(bad))
    assert resp.status_code == 500
    assert fault_code(resp) == "ErrorSchemaValidation"


def test_unknown_operation_is_a_schema_violation(ews):
    resp = post(ews.url, soap("<m:MakeCoffee><m:Sugar>2</m:Sugar></m:MakeCoffee>"))
    assert fault_code(resp) == "ErrorSchemaValidation"


HOSTILE = {
    "not xml": b"\x00\x01\x02 definitely not xml",
    "truncated": soap(GET_CALENDAR)[:-40],
    "not soap": b'<?xml version="1.0"?><html><body>hi</body></html>',
    "empty body": soap(""),
    "billion laughs": (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>&lol3;</s:Body></s:Envelope>'
    ),
    "external entity": (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>&xxe;</s:Body></s:Envelope>'
    ),
    "deep nesting": soap("<m:GetFolder>" + "<x>" * 5000 + "</x>" * 5000 + "</m:GetFolder>"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_gets_a_fault_and_the_server_keeps_serving(ews, name):
    resp = post(ews.url, HOSTILE[name])
    assert resp.status_code in (400, 500)
    assert fault_code(resp) in ("ErrorSchemaValidation", "ErrorInvalidRequest")
    assert b"root:" not in resp.content  # nothing from /etc/passwd leaks back
    assert response_code(post(ews.url, soap(GET_CALENDAR))) == "NoError"


def test_huge_body_is_refused_with_413(sim_factory):
    ews = sim_factory(SimulatorConfig(max_body_bytes=64 * 1024))
    resp = post(ews.url, soap("<m:GetFolder>" + "x" * 200_000 + "</m:GetFolder>"))
    assert resp.status_code == 413
    assert response_code(post(ews.url, soap(GET_CALENDAR))) == "NoError"


def test_wrong_content_type_is_refused(ews):
    resp = requests.post(ews.url, data=soap(GET_CALENDAR), auth=BASIC, headers={"Content-Type": "application/json"},
                         timeout=10)
    assert resp.status_code == 415


def test_get_is_not_allowed(ews):
    assert requests.get(ews.url, auth=BASIC, timeout=10).status_code == 405


def test_malformed_ntlm_token_is_challenged_again(ews):
    resp = post(ews.url, soap(GET_CALENDAR), auth=None, Authorization="NTLM bm90LW50bG0=")
    assert resp.status_code == 401
    resp = post(ews.url, soap(GET_CALENDAR), auth=None, Authorization="NTLM !!!not-base64!!!")
    assert resp.status_code == 401


def test_unknown_impersonated_mailbox_is_error_non_existent_mailbox(ews):
    header = IMPERSONATE_ROOM1.replace("room1@contoso.com", "nobody@contoso.com")
    resp = post(ews.url, soap(GET_CALENDAR, header=header))
    assert fault_code(resp) == "ErrorNonExistentMailbox"


def test_concurrency_budget_answers_server_busy_with_back_off(sim_factory):
    ews = sim_factory(SimulatorConfig(max_concurrent=1, back_off_ms=1234))
    ews.call(lambda: ews.sim.faults.latency.update({"GetFolder": 1.0}))
    results: list[requests.Response] = []

    def call() -> None:
        results.append(post(ews.url, soap(GET_CALENDAR)))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    busy = [r for r in results if r.status_code == 500]
    assert busy, "three concurrent calls against a budget of one must be throttled"
    assert {fault_code(r) for r in busy} == {"ErrorServerBusy"}
    detail = etree.fromstring(busy[0].content)
    value = detail.find(".//{http://schemas.microsoft.com/exchange/services/2006/types}Value")
    assert value is not None and value.get("Name") == "BackOffMilliseconds" and value.text == "1234"
    assert ews.sim.throttle.busy_answers >= 1


def test_exchangelib_sees_server_busy_with_its_back_off(sim_factory):
    ews = sim_factory(SimulatorConfig(max_concurrent=1, back_off_ms=2500))
    room = ews.room()
    room.calendar  # warm the folder cache
    ews.call(lambda: ews.sim.faults.latency.update({"FindItem": 1.0}))
    errors: list[BaseException] = []
    start = EWSDateTime.now(TZ)

    def view() -> None:
        try:
            list(room.calendar.view(start=start, end=start + timedelta(days=1)))
        except ErrorServerBusy as e:
            errors.append(e)

    threads = [threading.Thread(target=view) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors and all(getattr(e, "back_off", None) == 2.5 for e in errors)


def test_injected_503_reaches_the_client(ews):
    ews.call(lambda: setattr(ews.sim.faults, "http_503_next", 1))
    assert post(ews.url, soap(GET_CALENDAR)).status_code == 503
    assert post(ews.url, soap(GET_CALENDAR)).status_code == 200


def test_tls_with_generated_certificate(sim_factory, tmp_path):
    ews = sim_factory(tls=True)
    assert ews.url.startswith("https://")
    ca = tmp_path / "sim.pem"
    ca.write_bytes(ews.thread.cert_pem or b"")
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(ews.url, data=soap(GET_CALENDAR), auth=BASIC, timeout=10,
                      headers={"Content-Type": "text/xml"})
    resp = requests.post(ews.url, data=soap(GET_CALENDAR), auth=BASIC, timeout=10, verify=str(ca),
                         headers={"Content-Type": "text/xml"})
    assert response_code(resp) == "NoError"


def test_ntlm_over_tls_with_exchangelib(sim_factory, tmp_path, monkeypatch):
    ews = sim_factory(tls=True)
    ca = tmp_path / "sim.pem"
    ca.write_bytes(ews.thread.cert_pem or b"")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))

    class VerifyingAdapter(requests.adapters.HTTPAdapter):
        def send(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["verify"] = str(ca)
            return super().send(*args, **kwargs)

    monkeypatch.setattr(BaseProtocol, "HTTP_ADAPTER_CLS", VerifyingAdapter)
    cfg = Configuration(service_endpoint=ews.url, credentials=Credentials(*BASIC), auth_type=NTLM)
    room = Account("room1@contoso.com", config=cfg, access_type=IMPERSONATION, autodiscover=False)
    assert room.calendar.name == "Calendar"
