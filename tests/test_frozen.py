"""gateway/frozen.py: frozen slots dataclasses made fast are made the same: fields, defaults, derived fields,
frozenness, equality, hashing; what it does not write for is refused, and a subclass is made the usual way."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.frozen import copier, fast_init
from gateway.model import Booking, Event


def _record(name: str) -> type:
    """The same dataclass each time: one is made fast, the other left as the dataclass makes it."""

    @dataclass(frozen=True, slots=True)
    class Record:
        type: str  # (a field named as a builtin the generated code must not use)
        count: int = 3
        tags: tuple[str, ...] = ()
        derived: str = field(init=False, compare=False, default="")
        cached: int | None = field(init=False, compare=False, default=None)

        def __post_init__(self) -> None:
            object.__setattr__(self, "derived", f"{self.type}:{self.count}")

    Record.__name__ = Record.__qualname__ = name
    return Record


Sample: Any = fast_init(_record("Sample"))
Plain: Any = _record("Plain")


@dataclass(frozen=True, slots=True)
class Child(Sample):
    extra: str = "x"


def test_an_instance_is_the_one_the_dataclass_would_make() -> None:
    for args, kwargs in (((), {"type": "a"}), (("b", 5), {}), (("c",), {"tags": ("t",), "count": 0})):
        fast, plain = Sample(*args, **kwargs), Plain(*args, **kwargs)
        assert type(fast) is Sample
        assert [getattr(fast, s) for s in Sample.__slots__] == [getattr(plain, s) for s in Plain.__slots__]
        assert repr(fast) == repr(plain).replace("Plain", "Sample")
        assert fast == Sample(*args, **kwargs) and hash(fast) == hash(Sample(*args, **kwargs))
        assert pickle.loads(pickle.dumps(fast)) == fast
    assert str(inspect.signature(Sample)) == str(inspect.signature(Plain))
    with pytest.raises(TypeError):
        Sample()  # type: ignore[call-arg]  # (a required field left out: refused as the dataclass refuses it)
    with pytest.raises(TypeError):
        Sample("a", 1, (), "too many")  # type: ignore[call-arg]


def test_it_stays_frozen() -> None:
    s = Sample("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.count = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Booking(room="r", uid="u", start=_t(), end=_t()).subject = "changed"  # type: ignore[misc]


def test_a_subclass_is_made_the_usual_way() -> None:
    c = Child("a", 2, extra="y")
    assert type(c) is Child and c.extra == "y" and c.derived == "a:2"


def test_a_copy_has_every_slot_and_the_replaced_field() -> None:
    s = Sample("a", 7, ("t",))
    object.__setattr__(s, "cached", 42)
    c = copier(Sample, "count")(s, 8)
    assert type(c) is Sample and (c.type, c.count, c.tags, c.derived, c.cached) == ("a", 8, ("t",), "a:7", 42)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.count = 9  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field"):
        copier(Sample, "missing")


def test_what_it_does_not_write_for_is_refused() -> None:
    @dataclass(frozen=True, slots=True)
    class Factory:
        items: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int]

        def __post_init__(self, b: int) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Reserved:
        _fz_cls: int

    @dataclass(frozen=True, slots=True)
    class Derived(Plain):
        more: int = 0

    for cls in (Factory, KeywordOnly, WithInitVar, Reserved, Derived):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_models_hot_records_are_made_fast() -> None:
    for cls in (Booking, Event):
        assert cls.__init__.__module__ != dataclasses.__name__ and "_fz_init" in cls.__init__.__globals__


def _t() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)
