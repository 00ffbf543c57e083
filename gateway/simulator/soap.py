"""SOAP 1.1 envelopes as Exchange writes them: parsing (hardened), response messages and faults."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from lxml import etree

from gateway.simulator.schema import MNS, TNS, validate

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ENS = "http://schemas.microsoft.com/exchange/services/2006/errors"
NSMAP = {"s": SOAP, "m": MNS, "t": TNS}
RESP_NSMAP = {"m": MNS, "t": TNS}

# Exchange 2016 CU23, as it reports itself in every response header.
SERVER_VERSION = {
    "MajorVersion": "15",
    "MinorVersion": "1",
    "MajorBuildNumber": "2507",
    "MinorBuildNumber": "6",
    "Version": "V2017_07_11",
}
ACCEPTED_VERSIONS = (
    "Exchange2007_SP1",
    "Exchange2010",
    "Exchange2010_SP1",
    "Exchange2010_SP2",
    "Exchange2013",
    "Exchange2013_SP1",
    "Exchange2016",
)

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
)


class EwsError(Exception):
    """An EWS ResponseCode: becomes an error response message (or a SOAP fault when ``fault`` is set)."""

    def __init__(self, code: str, text: str = "", *, fault: bool = False, back_off_ms: int | None = None,
                 http_status: int = 500, extra: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text or code
        self.fault = fault
        self.back_off_ms = back_off_ms
        self.http_status = http_status
        self.extra = extra or {}


def t(tag: str) -> str:
    return f"{{{TNS}}}{tag}"


def m(tag: str) -> str:
    return f"{{{MNS}}}{tag}"


_CLARK: dict[str, str] = {}  # 't:Name' -> '{types namespace}Name' (sub() runs ~15 times per rendered item)


def sub(parent: etree._Element, tag: str, text: Any = None, **attrs: Any) -> etree._Element:
    """Append a child; ``tag`` is 't:Name' or 'm:Name'."""
    clark = _CLARK.get(tag)
    if clark is None:
        prefix, name = tag.split(":", 1)
        clark = _CLARK[tag] = f"{{{TNS if prefix == 't' else MNS}}}{name}"
    if attrs:
        el = etree.SubElement(parent, clark, {k: xs_text(v) for k, v in attrs.items() if v is not None})
    else:
        el = etree.SubElement(parent, clark)
    if text is not None:
        el.text = text if type(text) is str else xs_text(text)
    return el


# The text of each instant written lately: a calendar's times repeat (the same slots, day after day, room after room).
_DATETIME_TEXT: dict[datetime, str] = {}


def xs_text(value: Any) -> str:
    """A value as the text of an element or attribute (xs:boolean, xs:dateTime in UTC, ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        text = _DATETIME_TEXT.get(value)
        if text is None:
            if len(_DATETIME_TEXT) >= 100_000:
                _DATETIME_TEXT.clear()
            # isoformat: 3x faster than strftime, and still 30x slower than the lookup
            text = _DATETIME_TEXT[value] = value.astimezone(UTC).isoformat(timespec="seconds")[:19] + "Z"
        return text
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def parse_bool(text: str | None, default: bool = False) -> bool:
    if text is None:
        return default
    return text.strip().lower() in ("true", "1")


def parse_datetime(text: str, tz: Any = None) -> datetime:
    """xs:dateTime as Exchange reads it: an offset or Z means exactly that; none means ``tz`` (else UTC)."""
    s = text.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        value = datetime.fromisoformat(s)
    except ValueError as e:
        raise EwsError("ErrorInvalidRequest", f"Invalid dateTime {text!r}") from e
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz or UTC)
    return value.astimezone(UTC)


@dataclass
class Request:
    header: dict[str, etree._Element]
    body: etree._Element
    operation: str


def parse_envelope(data: bytes) -> Request:
    """Parse a SOAP request; DTDs (and with them entity expansion) are refused outright."""
    if b"<!DOCTYPE" in data[:4096].upper() or b"<!ENTITY" in data.upper():
        raise EwsError("ErrorSchemaValidation", "The request contains a DTD, which is prohibited.", fault=True,
                       http_status=500)
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as e:
        raise EwsError("ErrorSchemaValidation", f"The request failed schema validation: {e}", fault=True) from e
    if root.tag != f"{{{SOAP}}}Envelope":
        raise EwsError("ErrorSchemaValidation", "The request is not a SOAP 1.1 envelope.", fault=True)
    header: dict[str, etree._Element] = {}
    body_el = None
    for child in root:
        if child.tag == f"{{{SOAP}}}Header":
            for h in child:
                if isinstance(h.tag, str):
                    header[etree.QName(h).localname] = h
        elif child.tag == f"{{{SOAP}}}Body":
            body_el = child
    if body_el is None or len(body_el) == 0:
        raise EwsError("ErrorSchemaValidation", "The SOAP body is empty.", fault=True)
    op = body_el[0]
    if not isinstance(op.tag, str) or etree.QName(op).namespace != MNS:
        raise EwsError("ErrorInvalidRequest", "The request body is not an EWS operation.", fault=True)
    return Request(header=header, body=op, operation=etree.QName(op).localname)


def envelope(body_children: Iterable[etree._Element], header_children: Iterable[etree._Element] = ()) -> bytes:
    if header_children == ():
        # The usual answer: splice the serialized body into a prebuilt envelope instead of moving the body's
        # subtree into a new document (lxml walks every node of it to fix namespaces).
        head, tail = _envelope_parts()
        return head + b"".join(splice(etree.tostring(b, with_tail=False)) for b in body_children) + tail
    return _build_envelope(body_children, header_children)


def _build_envelope(body_children: Iterable[etree._Element], header_children: Iterable[etree._Element]) -> bytes:
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP})
    hdr = etree.SubElement(env, f"{{{SOAP}}}Header")
    svi = etree.SubElement(hdr, t("ServerVersionInfo"), SERVER_VERSION, nsmap={"h": TNS})
    del svi  # header element stays in the tree
    for h in header_children:
        hdr.append(h)
    body = etree.SubElement(env, f"{{{SOAP}}}Body")
    for b in body_children:
        body.append(b)
    return splice(etree.tostring(env, xml_declaration=True, encoding="utf-8"))


@functools.cache
def _envelope_parts() -> tuple[bytes, bytes]:
    head, body, tail = _build_envelope((), ()).partition(b"<s:Body/>")
    assert body, "the envelope template lost its body"
    return head + b"<s:Body>", b"</s:Body>" + tail


# A part of an answer written as text (itemxml.render_all) travels in the tree as a processing instruction and
# is spliced in when the envelope is written. While a request is served, the text is kept aside and the
# instruction holds its number (lxml would check and copy every character of it twice); otherwise the text is the
# instruction's own (ASCII, every '>' escaped, so '?>' ends it).
FRAGMENT_PI = "ews-fragment"
_OWN_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)  # blanks kept
_FRAGMENT_OPEN = f"<?{FRAGMENT_PI} ".encode()
_FRAGMENTS: ContextVar[list[str] | None] = ContextVar("ews_fragments", default=None)


def collect_fragments() -> None:
    """Keep the fragments of the answer about to be written aside (the server, as each request starts)."""
    _FRAGMENTS.set([])


def fragment(parent: etree._Element, xml: str) -> None:
    """Append ``xml`` (elements of the t/m prefixes declared on the response's root) to ``parent``."""
    store = _FRAGMENTS.get()
    if store is not None:
        parent.append(etree.PI(FRAGMENT_PI, f"#{len(store)}"))
        store.append(xml)
        return
    if not xml.isascii():
        xml = xml.encode("ascii", "xmlcharrefreplace").decode("ascii")  # as lxml writes non-ASCII text
    parent.append(etree.PI(FRAGMENT_PI, xml))


def splice(data: bytes) -> bytes:
    """Serialised XML with each fragment's processing instruction replaced by the fragment itself."""
    if _FRAGMENT_OPEN not in data:
        return data
    store = _FRAGMENTS.get()
    head, *rest = data.split(_FRAGMENT_OPEN)
    out = [head]
    for part in rest:
        xml, end, tail = part.partition(b"?>")
        assert end, "a fragment without its end"
        if xml[:1] == b"#":
            assert store is not None, "a fragment kept aside by another request"
            xml = store[int(xml[1:])].encode("ascii", "xmlcharrefreplace")
        out += (xml, tail)
    return b"".join(out)


def has_fragments(element: etree._Element) -> bool:
    return next(element.iter(etree.PI), None) is not None


def materialize(element: etree._Element) -> etree._Element:
    """The element with its fragments parsed into elements (for the schema check and fault injection)."""
    if not has_fragments(element):
        return element
    return etree.fromstring(splice(etree.tostring(element)), _OWN_PARSER)


def fault_body(err: EwsError) -> etree._Element:
    f = etree.Element(f"{{{SOAP}}}Fault")
    code = etree.SubElement(f, "faultcode", nsmap={"a": TNS})
    code.text = f"a:{err.code}"
    fs = etree.SubElement(f, "faultstring")
    fs.set("{http://www.w3.org/XML/1998/namespace}lang", "en-US")
    fs.text = err.text
    detail = etree.SubElement(f, "detail")
    e_code = etree.SubElement(detail, f"{{{ENS}}}ResponseCode", nsmap={"e": ENS})
    e_code.text = err.code
    e_msg = etree.SubElement(detail, f"{{{ENS}}}Message", nsmap={"e": ENS})
    e_msg.text = err.text
    if err.back_off_ms is not None or err.extra:
        mx = etree.SubElement(detail, t("MessageXml"), nsmap={"t": TNS})
        if err.back_off_ms is not None:
            v = etree.SubElement(mx, t("Value"), Name="BackOffMilliseconds")
            v.text = str(err.back_off_ms)
        for k, val in err.extra.items():
            v = etree.SubElement(mx, t("Value"), Name=k)
            v.text = val
    return f


@dataclass
class Responses:
    """Collects the ResponseMessages of one operation."""

    operation: str
    message_tag: str = ""
    error_container: str | None = None  # a child the schema requires even in an error message (m:Items)
    root: etree._Element = field(init=False)
    messages: etree._Element = field(init=False)

    def __post_init__(self) -> None:
        self.root = etree.Element(m(f"{self.operation}Response"), nsmap=RESP_NSMAP)
        self.messages = etree.SubElement(self.root, m("ResponseMessages"))
        if not self.message_tag:
            self.message_tag = f"{self.operation}ResponseMessage"

    def success(self) -> etree._Element:
        msg = etree.SubElement(self.messages, m(self.message_tag), ResponseClass="Success")
        sub(msg, "m:ResponseCode", "NoError")
        return msg

    def error(self, err: EwsError) -> etree._Element:
        msg = etree.SubElement(self.messages, m(self.message_tag), ResponseClass="Error")
        sub(msg, "m:MessageText", err.text)
        sub(msg, "m:ResponseCode", err.code)
        sub(msg, "m:DescriptiveLinkKey", 0)
        if err.back_off_ms is not None or err.extra:
            mx = sub(msg, "m:MessageXml")
            if err.back_off_ms is not None:
                sub(mx, "t:Value", err.back_off_ms, Name="BackOffMilliseconds")
            for k, v in err.extra.items():
                sub(mx, "t:Value", v, Name=k)
        if self.error_container:
            sub(msg, self.error_container)
        return msg


def unsupported(operation: str, err: EwsError) -> etree._Element | None:
    """A schema-valid error response for an operation this server does not implement (None if none fits).

    Which shape an operation's response takes (ResponseMessages of <Op>ResponseMessage, or one message as the
    root itself) is read off the schema by trying each, once per operation.
    """
    how = _unsupported_variant(operation)
    return _unsupported_shape(operation, err, how) if how is not None else None


@functools.cache
def _unsupported_variant(operation: str) -> tuple[int, tuple[str, ...]] | None:
    """How to shape the error: (variant, children the schema requires of an error message); None if no shape fits."""
    probe = EwsError("ErrorInvalidOperation", "probe")
    for variant in range(3):
        required: tuple[str, ...] = ()
        for _ in range(3):
            problem = validate(_unsupported_shape(operation, probe, (variant, required)))
            if problem is None:
                return variant, required
            expected = re.findall(r"\{" + re.escape(MNS) + r"\}(\w+)", problem.partition("Expected is")[2])
            expected = [name for name in expected if name != "MessageXml"]
            if "Missing child" not in problem or not expected:
                break
            required += (expected[-1],)  # an empty container the schema insists on (m:Items, ...)
    return None


def _unsupported_shape(operation: str, err: EwsError, how: tuple[int, tuple[str, ...]]) -> etree._Element:
    variant, required = how
    base = operation.removesuffix("Request")
    if variant == 0:
        out = Responses(base)
        msg = out.error(err)
        root = out.root
    else:
        root = etree.Element(m(f"{base}Response"), nsmap=RESP_NSMAP)
        msg = root if variant == 1 else sub(root, "m:ResponseMessage")
        msg.set("ResponseClass", "Error")
        sub(msg, "m:MessageText", err.text)
        sub(msg, "m:ResponseCode", err.code)
        sub(msg, "m:DescriptiveLinkKey", 0)
    for name in required:
        sub(msg, f"m:{name}")
    return root
