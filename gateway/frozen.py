"""Frozen slots dataclasses made as fast as mutable ones.

A frozen dataclass's own ``__init__`` sets each field with ``object.__setattr__`` (its ``__setattr__`` refuses
every store): a call a field, 5.2 µs for 29 fields where the same class unfrozen takes 0.5 µs. An import makes a
Booking (29 slots), an Event and the Event's sequenced copy for every booking. A class of a few fields gains nothing
(the two changes of class cost what four stores do).

``fast_init`` gives such a class an ``__init__`` that makes the new instance, for the length of its stores, one of a
twin class with the very same slots and no ``__setattr__`` of its own (plain attribute stores, the interpreter's
fastest), then the class's own again, before ``__post_init__`` and before anyone else can see it. ``copier`` copies
an instance field by field the same way. What they make is an instance of the class like any other: frozen, equal,
hashed and printed as before. A subclass's instance (a twin has its parent's slots only) is made the usual way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

C = TypeVar("C", bound=type)


def _twin(cls: type) -> type:
    twin = cls.__dict__.get("_unfrozen")
    if twin is None:
        slots: tuple[str, ...] = cls.__dict__["__slots__"]
        twin = type(f"_{cls.__name__}Unfrozen", (), {"__slots__": slots})
        type.__setattr__(cls, "_unfrozen", twin)
    return twin


def fast_init(cls: C) -> C:
    """Decorate a ``@dataclass(frozen=True, slots=True)`` (placed above it): its ``__init__``, the same arguments and
    defaults, made as fast as an unfrozen class's. Fields with a default factory, keyword-only fields and InitVars
    are not written for: such a class is refused rather than built wrongly."""
    if cls.__bases__ != (object,):  # (a twin has the class's own slots only: its layout would differ)
        raise TypeError(f"{cls.__name__}: fast_init makes classes without a base of their own")
    frozen_init = cls.__dict__["__init__"]  # (the dataclass's own)
    params = dict(list(inspect.signature(frozen_init).parameters.items())[1:])
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if list(params) != [f.name for f in fields] or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params.values()) \
            or any(f.default_factory is not dataclasses.MISSING for f in dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: fast_init writes only positional fields with plain defaults")
    if any(f.name.startswith("_fz_") for f in dataclasses.fields(cls)):  # (the names the code below uses)
        raise TypeError(f"{cls.__name__}: a field's name starts with _fz_")
    namespace: dict[str, Any] = {"_fz_cls": cls, "_fz_twin": _twin(cls), "_fz_set": object.__setattr__,
                                 "_fz_init": frozen_init, "_fz_type": type}
    args = []
    for f in fields:
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            namespace[f"_fz_d_{f.name}"] = f.default
            args.append(f"{f.name}=_fz_d_{f.name}")
    body = [f"        self.{f.name} = {f.name}" for f in fields]
    for f in dataclasses.fields(cls):  # (not arguments: set to their default, as the dataclass does)
        if not f.init and f.default is not dataclasses.MISSING:
            namespace[f"_fz_d_{f.name}"] = f.default
            body.append(f"        self.{f.name} = _fz_d_{f.name}")
    post = ["    self.__post_init__()"] if hasattr(cls, "__post_init__") else []
    lines = [f"def __init__(self, {', '.join(args)}):",
             "    if _fz_type(self) is not _fz_cls:",
             f"        _fz_init(self, {', '.join(f.name for f in fields)})",
             "        return",
             "    _fz_set(self, '__class__', _fz_twin)",
             "    try:", *body,
             "    finally:",
             "        self.__class__ = _fz_cls", *post]
    exec("\n".join(lines), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__, init.__annotations__ = frozen_init.__doc__, frozen_init.__annotations__
    type.__setattr__(cls, "__init__", init)
    return cls


def copier(cls: type, replaced: str) -> Callable[[Any, Any], Any]:
    """A function that copies an instance of the frozen slots dataclass ``cls`` field by field (all its slots, what
    ``__post_init__`` derived too), with the field ``replaced`` set to a new value: ``dataclasses.replace`` without
    ``__init__``, as straight-line code (a loop over the slots cost twice as much)."""
    slots: tuple[str, ...] = cls.__dict__["__slots__"]
    if replaced not in slots:
        raise TypeError(f"{cls.__name__} has no field {replaced}")
    lines = ["def copy(self, value, _new=object.__new__, _twin=_fz_twin, _cls=_fz_cls):",
             "    c = _new(_twin)"]
    lines += [f"    c.{name} = {'value' if name == replaced else f'self.{name}'}" for name in slots]
    lines += ["    c.__class__ = _cls", "    return c"]
    namespace: dict[str, Any] = {"_fz_cls": cls, "_fz_twin": _twin(cls)}
    exec("\n".join(lines), namespace)
    return namespace["copy"]
