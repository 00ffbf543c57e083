"""Secret: a value that never prints itself.

Whatever touches a Secret by accident — ``repr``, ``str``, an f-string, ``%s``, a structlog field, a dataclass
repr, a traceback that shows locals — sees ``**********``. The value comes out only through an explicit
``.reveal()`` at the one place that hands it to a library (exchangelib's Credentials, msal). Pickling is refused
so a secret cannot slip into a cache, a queue or a support bundle.

Python cannot wipe a string from memory; this protects against leaks through output, not against a core dump.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

MASK = "**********"

# Names of vault entries (and of ``vault:NAME`` references in the configuration).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")


class Secret:
    """A secret value; ``repr``/``str``/``format`` give ``**********``; ``.reveal()`` gives the value."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds text")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The value itself. Call this only where a library needs it, never to log or display it."""
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return MASK

    def __structlog__(self) -> str:  # structlog's JSON renderer asks for this before falling back to repr()
        return MASK

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("a Secret cannot be changed")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("a Secret cannot be changed")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled; keep it in the vault and resolve it where it is needed")

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: Any) -> Secret:
        return self
