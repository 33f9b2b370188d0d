"""Typed settings: nested dataclasses whose values are checked against their type hints when they are loaded.

Stdlib dataclasses and this small checker rather than pydantic or OmegaConf: pydantic is only in the ``serve``
extra and would become a heavy core install for the demo, OmegaConf knows neither ``Literal`` choices nor
ranges, and the recipe needs few types (numbers, integers, booleans, strings, choices, lists, one open mapping,
each possibly ``None``). A rule in ``Annotated[...]`` adds a range or a length. Every error is one line that
names the dotted key (``optim.lr: expected a number, got 'abc'``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from vggnet.errors import VggnetError

__all__ = ["Length", "OneOf", "Range", "RecipeError", "check", "from_dict"]

T = TypeVar("T")
_NONE = type(None)
_NAMES = {float: ("a number", "numbers"), int: ("an integer", "integers"), bool: ("true or false", "booleans"),
          str: ("a string", "strings")}


class RecipeError(VggnetError, ValueError):
    """A recipe (file, override or value) that cannot be used; the message names the key or the file."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``ge``/``gt`` below, ``le``/``lt`` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __call__(self, value: Any, key: str) -> None:
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if not ok:  # NaN fails every comparison, so it lands here too
            raise RecipeError(f"{key}: must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        low, high = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if low is not None and high is not None:
            return f"in {'[' if self.ge is not None else '('}{low:g}, {high:g}{']' if self.le is not None else ')'}"
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {low:g}"
        return f"{'<=' if self.le is not None else '<'} {high:g}"


@dataclass(frozen=True)
class Length:
    """A list of exactly ``n`` items."""

    n: int

    def __call__(self, value: Any, key: str) -> None:
        if len(value) != self.n:
            raise RecipeError(f"{key}: expected {self.n} values, got {len(value)}: {value!r}")


@dataclass(frozen=True)
class OneOf:
    """A string from a list known only at run time (e.g. the model zoo's names)."""

    options: Callable[[], Iterable[str]]

    def __call__(self, value: Any, key: str) -> None:
        known = list(self.options())
        if value not in known:
            raise RecipeError(f"{key}: unknown value {value!r}; choose one of {', '.join(known)}")


def _strip(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the shape of ``hint``, ranges aside (which arm of a union it belongs to)."""
    hint = _strip(hint)
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in get_args(hint))
    if origin is list:
        return isinstance(value, list | tuple)
    if origin is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int | float if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return hint is Any


def describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for an error message."""
    hint = _strip(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arm is _NONE else describe(arm) for arm in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(str(a) for a in args)
    if origin is list:
        return f"a list of {_NAMES.get(_strip(args[0]), ('', 'values'))[1]}"
    if origin is dict:
        return f"a mapping of names to {_NAMES.get(_strip(args[1]), ('', 'values'))[1]}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return _NAMES.get(hint, (getattr(hint, "__name__", str(hint)),))[0]


def check(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` and its rules; a mapping for a dataclass becomes one."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        value = check(value, args[0], key)
        for rule in args[1:]:
            rule(value, key)
        return value
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        arm = next((a for a in args if a is not _NONE and _fits(value, a)), None)
        if arm is None:
            raise RecipeError(f"{key}: expected {describe(hint)}, got {value!r}")
        return check(value, arm, key)
    if not _fits(value, hint):
        raise RecipeError(f"{key}: expected {describe(hint)}, got {value!r}")
    if origin is list:
        return [check(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        return {str(k): check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{key}.")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``data``: every key checked, absent keys at their defaults.

    ``where`` is the dotted prefix of the keys in messages (``"optim."``). An unknown key is an error, so a typo
    (``optim.lr_rate``) is never silently ignored.
    """
    hints = get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise RecipeError(f"unknown recipe key {where + str(key)!r}; known: {', '.join(sorted(names))}")
    return cls(**{name: check(data[name], hints[name], where + name) for name in names if name in data})
