"""Bodies checked against the local API's OpenAPI document (gateway/api.py), with a plain JSON Schema validator."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from gateway.api import OPENAPI


def pointer(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def for_validation(doc: dict[str, Any]) -> Registry:
    """A registry for validating with plain JSON Schema: OpenAPI tools treat each schema under components/schemas
    as its own resource (so refs inside an embedded published schema are relative to its $id); a JSON Schema
    resolver does not look inside an OpenAPI document, so those schemas are registered under their $id and refs
    to them point there."""
    embedded = {f"#/components/schemas/{name}": schema["$id"]
                for name, schema in doc["components"]["schemas"].items() if "$id" in schema}

    def redirect(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("$ref") in embedded:
                return {**node, "$ref": embedded[node["$ref"]]}
            return {k: redirect(v) for k, v in node.items()}
        if isinstance(node, list):
            return [redirect(v) for v in node]
        return node
    resources = [(BASE, DRAFT202012.create_resource(redirect(doc)))]
    resources += [(schema["$id"], DRAFT202012.create_resource(schema))
                  for schema in doc["components"]["schemas"].values() if "$id" in schema]
    return Registry().with_resources(resources)


BASE = "urn:gateway:openapi"
REGISTRY = for_validation(OPENAPI)


def schema_ref(ref: str) -> dict[str, str]:
    """A $ref, usable from outside the document, to the schema at ``ref`` (#/components/schemas/NAME)."""
    target = pointer(OPENAPI, ref)
    return {"$ref": target.get("$id", f"{BASE}{ref}")}


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    response = OPENAPI["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = pointer(OPENAPI, response["$ref"])
    content = response["content"]
    schema = (content.get("application/json") or content["application/problem+json"])["schema"]
    return schema_ref(schema["$ref"]) if "$ref" in schema else schema


def conforms(body: Any, path: str, method: str, status: int) -> None:
    validator = Draft202012Validator(response_schema(path, method, status), registry=REGISTRY)
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method.upper()} {path} {status}: {errors[0].message}"
