"""Microsoft's EWS schema, loaded once with the two in-memory patches lxml needs (see ews_schema/README.md)."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

XS = "http://www.w3.org/2001/XMLSchema"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
SCHEMA_DIR = Path(__file__).with_name("ews_schema")

_XML_XSD = b"""<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"
 targetNamespace="http://www.w3.org/XML/1998/namespace"><xs:attribute name="lang" type="xs:language"/></xs:schema>"""


@functools.cache
def _types_tree() -> etree._ElementTree:
    tree = etree.parse(str(SCHEMA_DIR / "types.xsd"))
    ns = {"xs": XS}
    for imp in tree.xpath("//xs:import[@namespace='http://www.w3.org/XML/1998/namespace']", namespaces=ns):
        imp.set("schemaLocation", "xml.xsd")
    seq = tree.xpath("//xs:complexType[@name='ArrayOfTransitionsType']/xs:sequence", namespaces=ns)[0]
    for child in list(seq):
        seq.remove(child)
    etree.SubElement(seq, f"{{{XS}}}element", ref="t:Transition", minOccurs="0", maxOccurs="unbounded")
    return tree


class _Resolver(etree.Resolver):
    def resolve(self, system_url, public_id, context):  # type: ignore[no-untyped-def,unused-ignore]
        if system_url.endswith("types.xsd"):
            return self.resolve_string(etree.tostring(_types_tree()), context)
        if system_url.endswith("xml.xsd"):
            return self.resolve_string(_XML_XSD, context)
        return None


@functools.cache
def ews_schema() -> etree.XMLSchema:
    """The compiled schema of messages.xsd + types.xsd (about 0.15 s, once per process)."""
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(_Resolver())
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "messages.xsd"), parser))


def validate(element: etree._Element) -> str | None:
    """Validate one child of soap:Header or soap:Body; return the first violation, or None."""
    schema = ews_schema()
    if schema.validate(element):
        return None
    err = schema.error_log.last_error
    return f"{err.message} (line {err.line})" if err else "invalid"


# Response shapes already proven valid in a request of the same operation. A later request with the same shape
# is checked with a minimal shape in its place: the verdict is the same (the EWS schema has no identity
# constraints and no xs:ID, so an element's validity does not depend on what its siblings contain), and a shape's
# AdditionalProperties are the costliest part of a request to check (each FieldURI against an enumeration of
# hundreds of values; a client sends the same shape on every call).
_SHAPES = {f"{{{MNS}}}ItemShape": "ItemShape", f"{{{MNS}}}FolderShape": "FolderShape"}
_PROVEN: dict[bytes, None] = {}


def validate_request(body: etree._Element) -> str | None:
    """``validate`` of an operation's request element, remembering the response shapes it proved valid."""
    shape = next((child for child in body if child.tag in _SHAPES), None)
    if shape is None or len(shape) < 2:
        return validate(body)
    key = f"{body.tag} ".encode() + etree.tostring(shape)
    if key not in _PROVEN:
        problem = validate(body)
        if problem is None:
            if len(_PROVEN) >= 4096:
                _PROVEN.clear()
            _PROVEN[key] = None
        return problem
    stub = etree.Element(shape.tag)
    etree.SubElement(stub, f"{{{TNS}}}BaseShape").text = "IdOnly"
    body.replace(shape, stub)
    try:
        return validate(body)
    finally:
        body.replace(stub, shape)


@functools.cache
def child_order(type_name: str) -> dict[str, int]:
    """Element name -> position in the sequence of a types.xsd complex type, base types first."""
    ns = {"xs": XS}
    tree = _types_tree()
    order: list[str] = []

    def walk(name: str) -> None:
        found = tree.xpath(f"//xs:complexType[@name='{name}']", namespaces=ns)
        if not found:
            return
        ctype = found[0]
        ext = ctype.xpath("xs:complexContent/xs:extension", namespaces=ns)
        if ext:
            walk(ext[0].get("base").split(":")[-1])
            body = ext[0]
        else:
            body = ctype
        for el in body.xpath(".//xs:element", namespaces=ns):
            n = el.get("name") or el.get("ref", "").split(":")[-1]
            if n and n not in order:
                order.append(n)

    walk(type_name)
    return {n: i for i, n in enumerate(order)}
