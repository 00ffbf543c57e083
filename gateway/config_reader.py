"""Reading the settings' sources and telling their problems: YAML with the line of every key, environment overrides
with the variable behind every value, and pydantic's errors said the gateway's way with their place.

pydantic validates, but knows neither YAML lines nor environment variables: this module keeps both while it builds
the raw data, then turns each error's location back into ``file:line`` or ``env GATEWAY_…`` and its message into
what to change (``unknown setting; did you mean 'ews_url'?``). The models are the caller's (``gateway.config``):
nothing here knows a section's settings.

The environment is read here rather than by pydantic-settings, whose source reads only ``os.environ``, wants lists
as JSON, cannot say which variable set a value and ignores misspelt variables.
"""

from __future__ import annotations

import datetime
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Final, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

ENV_PREFIX: Final = "GATEWAY_"
CONFIG_PATH_ENV: Final = "GATEWAY_CONFIG"

Key = tuple[str | int, ...]
_T = TypeVar("_T")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "pass", "secret", "client_secret", "token", "credentials"})


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, where it is, and what to do about it."""

    where: str  # "config/gateway.yaml:12", "env GATEWAY_EXCHANGE__EWS_URL", "config/gateway.yaml" or ""
    key: str  # exchange.ews_url, rooms.mailboxes[2]
    message: str
    line: int | None = None  # in the file, when the problem is there

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}" if self.where else f"{self.key}: {self.message}"


class Hint:
    """Field metadata: what to write instead of a wrong choice, by the wrong choice (lowercase)."""

    def __init__(self, **choices: str) -> None:
        self.choices = choices


class SettingsReader:
    """The file merged with the environment, where each value came from, and the problems found so far."""

    def __init__(self, root: type, path: str | os.PathLike[str] | None, env: Mapping[str, str],
                 sections: Iterable[str]) -> None:
        if path is None and env.get(CONFIG_PATH_ENV):
            path = env[CONFIG_PATH_ENV]
        self.root, self.file, self.env = root, (Path(path) if path is not None else None), env
        self.data: dict[str, Any] = {}
        self.lines: dict[Key, int] = {}
        self.env_names: dict[Key, str] = {}
        self.problems: list[Problem] = []
        self.fatal = False
        if self.file is not None:
            self._read_file(self.file)
        if not self.fatal:
            self._read_env(tuple(sections))

    def validate(self, model: type[_T], section: str | None = None, **context: Any) -> _T | None:
        """The model from the data (or from one section of it), or None with its problems recorded."""
        data = self.data.get(section, {}) if section else self.data
        try:
            return TypeAdapter(model).validate_python(data, context={"env": self.env, **context})
        except ValidationError as e:
            for err in e.errors(include_url=False):
                key = ((section,) if section else ()) + self._untagged(tuple(p for p in err["loc"] if p != "[key]"))
                self.problem(key, self._say(err["type"], key, err.get("input"), err["msg"]))
            return None

    def problem(self, key: Key, message: str) -> None:
        where, line = (str(self.file) if self.file else ""), None
        for n in range(len(key), 0, -1):  # a value given in no place (missing) points at its section
            if key[:n] in self.env_names:
                where = f"env {self.env_names[key[:n]]}"
                break
            if key[:n] in self.lines:
                line = self.lines[key[:n]]
                where = f"{self.file}:{line}"
                break
        self.problems.append(Problem(where, dotted(key), message, line))

    def ordered(self) -> tuple[Problem, ...]:
        """The file's problems in line order, then the environment's."""
        return tuple(sorted(self.problems, key=lambda p: (p.where.startswith("env "), p.line or 0)))

    def _fatal(self, where: str, key: str, message: str, line: int | None = None) -> None:
        self.problems.append(Problem(where, key, message, line))
        self.fatal = True

    def _read_file(self, file: Path) -> None:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._fatal(str(file), "(file)", "there is no configuration file here; copy config/gateway."
                               f"example.yaml and adapt it, or point --config / {CONFIG_PATH_ENV} at yours")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text"
            return self._fatal(str(file), "(file)", f"cannot read it ({why}); check the path and that the gateway's "
                               "user may read it")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = self._construct(loader, node, ()) if node is not None else {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
            return self._fatal(where, "(syntax)", f"{getattr(e, 'problem', None) or 'invalid YAML'}; check the "
                               "indentation, quoting and colons here", mark.line + 1 if mark is not None else None)
        finally:
            loader.dispose()
        if not isinstance(data, dict):
            return self._fatal(f"{file}:1", "(file)", "must be a mapping of sections (exchange:, rooms:, sync: …)", 1)
        self.data = data

    def _construct(self, loader: yaml.SafeLoader, node: yaml.Node, key: Key) -> Any:
        """Python values from the node tree, remembering the line of every key and list item; an empty value
        (``key:`` alone) is as if the key were not there."""
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolves << merge keys
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                child, line = (*key, str(loader.construct_object(knode, deep=True))), knode.start_mark.line + 1
                if child in self.lines:
                    self.problems.append(Problem(f"{self.file}:{line}", dotted(child), f"appears twice (first on "
                                                 f"line {self.lines[child]}); YAML would silently keep only the "
                                                 "last one, so remove one", line))
                self.lines[child] = line
                value = self._construct(loader, vnode, child)
                if value is not None and value != "":
                    out[str(child[-1])] = value
            return out
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*key, i)] = item.start_mark.line + 1
            return [self._construct(loader, item, (*key, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    def _read_env(self, sections: tuple[str, ...]) -> None:
        known = fields_of(self.root)
        for var in sorted(self.env):
            if not var.startswith(ENV_PREFIX):
                continue
            rest = var[len(ENV_PREFIX):].lower()
            parts = tuple(rest.split("__"))
            if len(parts) < 2:  # GATEWAY_EXCHANGE_EWS_URL would be silently ignored: say so
                for section in sections:  # (other GATEWAY_* variables without "__" are not ours)
                    name = rest[len(section) + 1:]
                    if rest.startswith(section + "_") and name in fields_of(bare(known[section].annotation)):
                        self.problems.append(Problem(f"env {var}", f"{section}.{name}", f"ignored: write {ENV_PREFIX}"
                                                     f"{section.upper()}__{name.upper()} (two underscores between "
                                                     "section and setting)"))
            elif not all(parts):
                self.problems.append(Problem(f"env {var}", ".".join(parts), "malformed name; use GATEWAY_<SECTION>"
                                             "__<SETTING>, e.g. GATEWAY_EXCHANGE__EWS_URL"))
            elif parts[0] not in known:
                self.problems.append(Problem(f"env {var}", parts[0], unknown(parts[0], known, "section")))
            else:
                self._override(var, parts)

    def _override(self, var: str, key: tuple[str, ...]) -> None:
        """Set the value; a list of named items (sources) is entered by an item's name, which becomes its index."""
        node: Any = self.data
        placed: Key = ()
        for part in key[:-1]:
            if isinstance(node, list) and all(isinstance(item, dict) for item in node):
                names = [str(item.get("name", "")).lower() for item in node if isinstance(item, dict)]
                if part not in names:
                    known = ", ".join(n for n in names if n) or "none"
                    self.problems.append(Problem(f"env {var}", dotted((*placed, part)), f"there is no item named "
                                                 f"{part!r} in the file (names: {known}); items of a list are "
                                                 "overridden by their name"))
                    return
                node, placed = node[names.index(part)], (*placed, names.index(part))
                continue
            if not isinstance(node, dict):
                return  # the file's value there is not a mapping (of settings, or of named items): validation says so
            placed = (*placed, part)
            if part not in node:
                node[part] = {}
                self.env_names.setdefault(placed, var)
            node = node[part]
        if not isinstance(node, dict):
            if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
                self.problems.append(Problem(f"env {var}", dotted(placed), "is a list of named items; override one "
                                             f"item's setting: {ENV_PREFIX}{'__'.join(map(str, placed)).upper()}"
                                             "__<NAME>__<SETTING>"))
            return
        node.pop(key[-1], None)
        if self.env[var].strip():  # an empty value unsets
            node[key[-1]] = self._typed(self.env[var], (*placed, key[-1]))
        self.env_names[(*placed, key[-1])] = var

    def _typed(self, text: str, key: Key) -> Any:
        """Text from the environment as the setting's type where it reads as one (otherwise validation says why)."""
        _, found = self._walk(key)
        kind = bare(found.annotation) if found is not None else str
        low = text.strip().lower()
        if kind is bool and low in _TRUE | _FALSE:
            return low in _TRUE
        if kind in (int, float):
            try:
                return kind(low)
            except ValueError:
                return text
        if get_origin(kind) is tuple:
            return [item.strip() for item in text.split(",") if item.strip()]
        return text

    def _item(self, key: Key) -> Any:
        node: Any = self.data
        for part in key:
            listed = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            if listed or (isinstance(node, dict) and part in node):
                node = node[part]
            else:
                return None
        return node

    def _untagged(self, loc: Key) -> Key:
        """pydantic's place without the tag of a union told apart by ``kind`` (sources[1].graph.x: sources[1].x)."""
        out: list[str | int] = []
        for i, part in enumerate(loc):
            if i and isinstance(loc[i - 1], int) and isinstance(part, str):
                item = self._item(tuple(out))
                if isinstance(item, dict) and str(item.get("kind", "")).lower() == part:
                    continue
            out.append(part)
        return tuple(out)

    def _member(self, union: Any, key: Key) -> Any:
        """The member of a union of models told apart by ``kind`` that the item at ``key`` is (else the first)."""
        members = [bare(m) for m in get_args(union)]
        item = self._item(key)
        said = str(item.get("kind", "")).lower() if isinstance(item, dict) else ""
        for m in members:
            field = fields_of(m).get("kind")
            if field is not None and said in {str(c).lower() for c in get_args(bare(field.annotation))}:
                return m
        return members[0]

    def _walk(self, key: Key) -> tuple[Any, Any]:
        """(the model that holds the last part of ``key``, pydantic's FieldInfo for it or None)."""
        kind: Any = self.root
        owner, found = None, None
        for at, part in enumerate(key):
            kind = bare(kind)
            if fields := getattr(kind, "__pydantic_fields__", None):
                owner, found = kind, fields.get(part)
                kind = found.annotation if found is not None else None
            elif get_origin(kind) in (dict, Mapping):
                owner, found, kind = None, None, get_args(kind)[1]
            elif get_origin(kind) is tuple:
                item = bare(get_args(kind)[0])
                if get_origin(item) in (Union, UnionType):  # items of several kinds: the one this item is
                    item = self._member(item, key[:at + 1])
                if isinstance(part, int) and fields_of(item):  # an item with settings of its own
                    kind = item
                # otherwise a plain item stays under its field (rooms.mailboxes[2])
            else:
                return None, None
        return owner, found

    def _say(self, kind: str, key: Key, value: Any, default: str) -> str:
        """pydantic's error, said as the gateway says it."""
        owner, found = self._walk(key)
        meta = found.metadata if found is not None else []
        hint = next((m for m in meta if isinstance(m, Hint)), Hint())
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            return unknown(str(key[-1]), fields_of(owner), "section" if owner is self.root else "setting")
        if kind in ("missing", "missing_argument"):
            return f"required: {found.description}" if found is not None else "required"
        if kind in ("int_type", "int_parsing", "int_from_float"):
            return f"must be a whole number, not {value:g}" if isinstance(value, float) else \
                f"must be a whole number, not {_kind(value)}"
        if kind == "literal_error" and found is not None:
            choices = get_args(bare(found.annotation))
            if not isinstance(value, str):
                return f"must be one of {', '.join(choices)}, not {_kind(value)}"
            lower = {c.lower(): c for c in choices}
            close = difflib.get_close_matches(value.lower(), lower, n=1, cutoff=0.6)
            said = hint.choices.get(value.lower()) or (f"did you mean '{lower[close[0]]}'?" if close else "")
            return f"{value!r} is not one of {', '.join(choices)}" + (f" ({said})" if said else "")
        return _SAID[kind].format(kind=_kind(value)) if kind in _SAID else default


_SAID = {
    "float_type": "must be a number, not {kind}", "float_parsing": "must be a number, not {kind}",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be text, not {kind} (put it in quotes)", "path_type": "must be text, not {kind}",
    **dict.fromkeys(("date_type", "date_parsing", "date_from_datetime_parsing", "date_from_datetime_inexact"),
                    "must be a date, written YYYY-MM-DD"),
    "tuple_type": "must be a list, not {kind}", "list_type": "must be a list, not {kind}",
    **dict.fromkeys(("dataclass_type", "dataclass_exact_type", "dict_type", "mapping_type"),
                    "must be a mapping of settings (indented `name: value` lines below it)"),
}


def fields_of(model: Any) -> dict[str, Any]:
    """The settings a model reads (pydantic's FieldInfo by name), or {} for anything that is not a model."""
    return {n: f for n, f in getattr(model, "__pydantic_fields__", {}).items() if f.init is not False}


def bare(annotation: Any) -> Any:
    """int for Annotated[int, ...] | None."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def unknown(name: str, names: Iterable[str], what: str = "setting") -> str:
    known = sorted(names)
    if name.lower() in _SECRET_WORDS:
        return ("a password or secret must not be part of the configuration; store it in the encrypted "
                "vault with `gateway credentials set exchange` and refer to it with password_ref: vault:exchange")
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known {what}s: {', '.join(known)}"
    return f"unknown {what}; {hint}"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    for types, name in ((int | float, "a number"), (str, "text"), (list, "a list"), (dict, "a mapping"),
                        (datetime.date, "a date")):
        if isinstance(value, types):
            return name
    return "nothing" if value is None else type(value).__name__


def dotted(key: Key) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in key).replace(".[", "[")
