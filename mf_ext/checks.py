"""Argument checks shared by the public API and the command line, so each rule and its message
is written once.

A check is called as `check(who, name, value)` and returns the value normalized (an int, a
float, a torch.device, ...). A value of the wrong type raises TypeError, a value of the right
type outside the allowed range raises ValueError; both say "<who>: <name> must be ..., got ...".
`check.parse(text)` reads the same setting from a command-line string, raising ValueError
"must be ..., got '<text>'" (mf_ext/commands/options.py turns it into an argparse error).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch


class Check:
    """One setting's rule. Subclasses define `normalize` (Python values) and `parse` (text)."""

    def __call__(self, who: str, name: str, value: Any) -> Any:
        try:
            return self.normalize(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{who}: {name} {exc}") from None

    def normalize(self, value: Any) -> Any:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        raise NotImplementedError


class _Ranged(Check):
    """A value of one kind ("an integer", "a number") that `test` accepts; `rule` says which
    ("an integer >= 1", "a finite number > 0", ...). None too when `optional`."""

    kind = ""

    def __init__(self, rule: str, test, optional: bool = False):
        self.rule, self.test, self.optional = rule, test, optional

    def normalize(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not self._is_kind(value):
            raise TypeError(f"must be {self.kind}, got {value!r}")
        return self._accept(self._convert(value), value)

    def parse(self, text: str) -> Any:
        try:
            value = self._convert(text)
        except ValueError:
            raise ValueError(f"must be {self.kind}, got {text!r}") from None
        return self._accept(value, text)

    def _accept(self, value: Any, given: Any) -> Any:
        if not self.test(value):
            raise ValueError(f"must be {self.rule}, got {given!r}")
        return value


class Integer(_Ranged):
    """An integer in [low, high] (high None: no upper bound); `bounds` rewords the range."""

    kind = "an integer"

    def __init__(self, low: int, high: Optional[int] = None, optional: bool = False,
                 bounds: Optional[str] = None):
        bounds = bounds or (f">= {low}" if high is None else f"in [{low}, {high}]")
        super().__init__(f"an integer {bounds}",
                         lambda x: x >= low and (high is None or x <= high), optional)

    @staticmethod
    def _is_kind(value: Any) -> bool:
        return isinstance(value, numbers.Integral)

    _convert = staticmethod(int)


class Number(_Ranged):
    """A real number (not a bool), as a float."""

    kind = "a number"

    @staticmethod
    def _is_kind(value: Any) -> bool:
        return isinstance(value, numbers.Real)

    _convert = staticmethod(float)


POSITIVE = Number("a finite number > 0", lambda x: math.isfinite(x) and x > 0)
NONNEGATIVE = Number("a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)
UNIT_INTERVAL = Number("a number in [0, 1]", lambda x: 0 <= x <= 1)
FRACTION = Number("in [0, 1)", lambda x: 0 <= x < 1)
SEED = Integer(0, 2**64 - 1, optional=True, bounds="in [0, 2**64)")


class OneOf(Check):
    """One of a few strings."""

    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(choices)
        self.text = " or ".join('"%s"' % c for c in self.choices)

    def normalize(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"must be {self.text}, got {value!r}")
        return value

    def parse(self, text: str) -> str:
        return self.normalize(text)


class Flag(Check):
    """A yes/no setting (kept as given, as bool() would accept anything)."""

    def normalize(self, value: Any) -> Any:
        return value


class Bool(Check):
    """True or False, nothing else (a command-line option --x / --no-x)."""

    def normalize(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be True or False, got {value!r}")
        return value


class FloatDType(Check):
    """torch.float32 or torch.float64."""

    def normalize(self, value: Any) -> torch.dtype:
        if value not in (torch.float32, torch.float64):
            raise TypeError(f"must be torch.float32 or torch.float64, got {value!r}")
        return value


class Device(Check):
    """A torch device ("cpu", "cuda", "cuda:1", a torch.device); `choices` on the command line."""

    choices = ("cpu", "cuda")

    def normalize(self, value: Any) -> torch.device:
        return torch.device(value)

    def parse(self, text: str) -> str:
        return text


def check_int(who: str, name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """`value` as an int in [low, high]: TypeError for a non-integer (or a bool), ValueError out
    of range."""
    return Integer(low, high)(who, name, value)


def check_positive(who: str, name: str, value: Any) -> float:
    """`value` as a float, finite and > 0."""
    return POSITIVE(who, name, value)


def check_nonnegative(who: str, name: str, value: Any) -> float:
    """`value` as a float, finite and >= 0."""
    return NONNEGATIVE(who, name, value)
