"""EWS restrictions (t:Restriction's SearchExpression) as predicates, for FindItem and FindFolder alike.

The caller says how a property path (t:FieldURI, t:ExtendedFieldURI) reads from the things being searched; this
module knows And/Or/Not, Exists, Contains and the six comparisons, and how a constant compares with a value of
each type (numbers as numbers, times as instants, booleans as booleans, binaries as bytes).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from lxml import etree

from gateway.simulator.schema import TNS
from gateway.simulator.soap import EwsError, parse_datetime

T = TypeVar("T")
Getter = Callable[[T], Any]
# Reads the property path inside a restriction element and returns how to get its value from a searched object.
Operand = Callable[[etree._Element], Getter[T]]

_CONSTANT = f"{{{TNS}}}FieldURIOrConstant/{{{TNS}}}Constant"

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "IsEqualTo": lambda a, b: a == b,
    "IsNotEqualTo": lambda a, b: a != b,
    "IsGreaterThan": lambda a, b: a > b,
    "IsGreaterThanOrEqualTo": lambda a, b: a >= b,
    "IsLessThan": lambda a, b: a < b,
    "IsLessThanOrEqualTo": lambda a, b: a <= b,
}


def _constant(el: etree._Element) -> str:
    const = el.find(_CONSTANT)
    if const is None:
        raise EwsError("ErrorInvalidRestriction", "Only constants can be compared.")
    return const.get("Value", "")


def coerce(value: Any, text: str) -> tuple[Any, Any]:
    """(value, constant) made comparable: the constant is read as the value's type."""
    try:
        if isinstance(value, datetime):
            return value, parse_datetime(text)
        if isinstance(value, bool):
            return value, text.strip().lower() in ("true", "1")
        if isinstance(value, bytes):
            return value, base64.b64decode(text)
        if isinstance(value, int):
            return value, int(text)
        if isinstance(value, float):
            return value, float(text)
    except (ValueError, binascii.Error) as e:
        raise EwsError("ErrorInvalidRestriction", f"The constant {text!r} does not fit the property: {e}") from e
    return ("" if value is None else str(value)), text


def predicate(el: etree._Element, operand: Operand[T]) -> Callable[[T], bool]:
    """The predicate a SearchExpression element stands for."""
    name = etree.QName(el).localname
    if name in ("And", "Or"):
        parts = [predicate(c, operand) for c in el]
        return (lambda i: all(p(i) for p in parts)) if name == "And" else (lambda i: any(p(i) for p in parts))
    if name == "Not":
        inner = predicate(el[0], operand)
        return lambda i: not inner(i)
    if name == "Exists":
        getter = operand(el)
        return lambda i: getter(i) is not None
    if name == "Contains":
        return _contains(el, operand(el))
    if name in _COMPARE:
        getter = operand(el)
        text = _constant(el)
        cmp = _COMPARE[name]

        def test(i: T) -> bool:
            value = getter(i)
            if value is None:
                return name == "IsNotEqualTo"
            a, b = coerce(value, text)
            return bool(cmp(a, b))
        return test
    raise EwsError("ErrorInvalidRestriction", f"Restriction {name} is not supported.")


def _contains(el: etree._Element, getter: Getter[T]) -> Callable[[T], bool]:
    const = el.find(f"{{{TNS}}}Constant")
    needle = const.get("Value", "") if const is not None else ""
    ignore_case = "Ignore" in el.get("ContainmentComparison", "")
    mode = el.get("ContainmentMode", "Substring")
    if ignore_case:
        needle = needle.lower()

    def contains(i: T) -> bool:
        text = str(getter(i) or "")
        text = text.lower() if ignore_case else text
        if mode == "FullString":
            return text == needle
        if mode == "Prefixed":
            return text.startswith(needle)
        if mode == "PrefixOnWords":
            return any(w.startswith(needle) for w in text.split())
        return needle in text  # Substring, ExactPhrase
    return contains
