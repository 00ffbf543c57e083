"""What the gateway changes in exchangelib 5.6. exchangelib offers no per-client hooks for these, so they patch its
classes, once for the process (``install``, idempotent, run when the EWS source module loads):

- every EWS request is reported to the call counter bound to the thread that makes it (``bind_calls``): each EWS
  source binds its own counter in its threads, so counts never mix between sources and need no global listeners;
- a response requests has already read in full is parsed in one piece, not one byte at a time;
- the session pool keeps its size on ErrorServerBusy;
- the CA bundle to verify Exchange's certificate with is chosen per EWS host (``trust``), so two sources may trust
  different private CAs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from exchangelib.errors import SessionPoolMinSizeReached
from exchangelib.protocol import BaseProtocol
from exchangelib.protocol import Protocol as EwsProtocol
from exchangelib.services.common import EWSService


class CallSink(Protocol):
    def add(self, operation: str, code: str) -> None: ...


_bound = threading.local()
_trusted: dict[str, str] = {}  # EWS host (netloc, lowercase) -> the CA bundle its certificate is verified with
_installed = False


def bind_calls(sink: CallSink | None) -> None:
    """Report the EWS requests this thread makes to ``sink`` (a thread pool's initializer)."""
    _bound.sink = sink


def count(operation: str, code: str) -> None:
    """Report one EWS request made without exchangelib's services (sources/ews/wire.py) to this thread's sink."""
    sink: CallSink | None = getattr(_bound, "sink", None)
    if sink is not None:
        sink.add(operation, code)


def trust(ews_url: str, ca_bundle: str) -> None:
    """Verify the certificate of the host of ``ews_url`` with ``ca_bundle`` (TLS is verified either way)."""
    _trusted[urlsplit(ews_url).netloc.lower()] = ca_bundle


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    original_response_xml = EWSService._get_response_xml
    original_soap_parts = EWSService._get_soap_parts.__func__

    def counted_response_xml(self: Any, payload: Any, **kwargs: Any) -> Any:
        sink: CallSink | None = getattr(_bound, "sink", None)
        try:
            result = original_response_xml(self, payload, **kwargs)
        except Exception as e:
            if sink is not None:
                sink.add(self.SERVICE_NAME, type(e).__name__)
            raise
        if sink is not None:
            sink.add(self.SERVICE_NAME, "NoError")
        return result

    def whole_body_soap_parts(cls: Any, response: Any) -> Any:
        """exchangelib 5.6 parses every response through iter_content() one byte at a time (about 1 s per MB);
        a response that requests has already read in full is handed over in one piece."""
        if isinstance(response, requests.Response) and response._content_consumed:
            response = _WholeBody(response.content)
        return original_soap_parts(cls, response)

    EWSService._get_response_xml = counted_response_xml
    EWSService._get_soap_parts = classmethod(whole_body_soap_parts)
    EwsProtocol.decrease_poolsize = _keep_pool_size
    BaseProtocol.HTTP_ADAPTER_CLS = VerifyingAdapter


class _WholeBody:
    def __init__(self, content: bytes) -> None:
        self.content = content

    def iter_content(self) -> Iterator[bytes]:
        return iter((self.content,))


def _keep_pool_size(self: Any) -> None:
    """exchangelib 5.6 shrinks its session pool on every ErrorServerBusy and never grows it back, and doing so
    under its pool lock can deadlock while a stream holds a session. Refusing (as at the minimum size) makes
    exchangelib pass ErrorExceededConnectionCount on instead of retrying; the gateway does its own back-off."""
    raise SessionPoolMinSizeReached("the gateway keeps exchangelib's session pool at its configured size")


def trusted_bundle(url: str) -> str | None:
    """The CA bundle the certificate of ``url``'s host is verified with, if one was given for it (``trust``)."""
    return _trusted.get(urlsplit(url).netloc.lower())


class VerifyingAdapter(requests.adapters.HTTPAdapter):
    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        bundle = trusted_bundle(request.url or "")
        if bundle is not None:
            kwargs["verify"] = bundle
        return super().send(request, *args, **kwargs)
