"""Estimator settings as one dataclass that the constructor, save/load and the command line all
read: each field, made by `setting()`, carries its default, its check (mf_ext/checks.py), a
one-line help and whether it is a command-line option and whether a saved model keeps it.

    @dataclass
    class MyConfig(Config):
        WHO: ClassVar[str] = "mf_ext.MyModel"
        rank: int = setting(64, Integer(1), "latent dimension r", cli=True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, FrozenSet

from mf_ext.checks import Check


def setting(default: Any, check: Check, help: str, cli: bool = False, saved: bool = True):
    """A Config field: `check(who, name, value)` validates and normalizes it on construction;
    `cli`: a command-line option --name-with-dashes; `saved`: kept in a saved model's
    "config" (device and dtype are not: the device is chosen at load time, the dtype is stored
    beside the tensors)."""
    return field(default=default,
                 metadata={"check": check, "help": help, "cli": cli, "saved": saved})


@dataclass
class Config:
    """Base of the settings dataclasses (subclass it with @dataclass and `setting()` fields)."""

    WHO: ClassVar[str] = "mf_ext"  # the prefix of every error message
    # The rule for files written before a setting existed: a setting missing from a saved
    # config takes its value here, which must reproduce what the code of the time did, or, if
    # it is not listed, its current default.
    OLD_FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.metadata["check"](self.WHO, f.name, getattr(self, f.name)))

    @classmethod
    def names(cls) -> FrozenSet[str]:
        return _field_names(cls)

    @classmethod
    def options(cls) -> list:
        """The fields that are command-line options, in declaration order."""
        return [f for f in fields(cls) if f.metadata["cli"]]

    def saved(self) -> Dict[str, Any]:
        """The settings a saved model keeps, as plain values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["saved"]}

    @classmethod
    def from_saved(cls, saved: Dict[str, Any], **others: Any) -> "Config":
        """The config of a saved model (`others`: the settings not in the file, such as device
        and dtype). Raises ValueError for settings this version does not know."""
        known = {f.name for f in fields(cls) if f.metadata["saved"]}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        return cls(**{**cls.OLD_FILE_DEFAULTS, **saved, **others})


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> FrozenSet[str]:
    return frozenset(f.name for f in fields(cls))  # asked on every setting read: cached
