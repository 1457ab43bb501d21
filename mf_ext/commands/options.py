"""argparse types, and the option groups that several commands share: `demo`'s training options
(factorize's meaning) and the options `fit` derives from a model's Config dataclass (each field
marked cli=True: its name, default, help and check)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Type

import torch

from mf_ext.checks import FRACTION, POSITIVE, SEED, Bool, Check, Device, Integer
from mf_ext.commands.errors import CliError
from mf_ext.config import Config

DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEVICES = Device.choices


def option_type(check: Check, name: str) -> Callable[[str], Any]:
    """An argparse `type` that reads a value with check.parse; a bad one is an argparse error
    "argument --x: must be ..., got '...'" (exit status 2)."""
    def parse(text: str) -> Any:
        try:
            return check.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name
    return parse


positive_int = option_type(Integer(1), "positive_int")
nonnegative_int = option_type(Integer(0), "nonnegative_int")
seed_int = option_type(SEED, "seed_int")
positive_float = option_type(POSITIVE, "positive_float")
fraction = option_type(FRACTION, "fraction")


def add_config_options(parser: argparse.ArgumentParser, config: Type[Config],
                       title: str) -> None:
    """One option --name-with-dashes per field of `config` marked cli=True, with the field's
    default, help and check."""
    group = parser.add_argument_group(title)
    for f in config.options():
        check = f.metadata["check"]
        kwargs: Dict[str, Any] = {"dest": f.name, "default": f.default}
        if isinstance(check, Bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hasattr(check, "choices"):
            kwargs["choices"] = check.choices
        else:
            kwargs["type"] = option_type(check, f.name)
        # (BooleanOptionalAction adds its own "(default: ...)")
        default = "" if f.default is None or isinstance(check, Bool) else f" (default {f.default})"
        group.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"] + default,
                           **kwargs)


def config_settings(config: Type[Config], args: argparse.Namespace) -> Dict[str, Any]:
    """The values of `config`'s command-line options in parsed `args`."""
    return {f.name: getattr(args, f.name) for f in config.options()}


def add_training_options(parser: argparse.ArgumentParser, steps: int, seed: int) -> None:
    """--rank, --steps, --lr, --seed, --device, --dtype, with factorize's meaning."""
    group = parser.add_argument_group("training")
    group.add_argument("--rank", type=positive_int, default=2,
                       help="latent dimension r of P (r, m) and Q (r, n) (default 2)")
    group.add_argument("--steps", type=nonnegative_int, default=steps,
                       help=f"Adam steps (default {steps})")
    group.add_argument("--lr", type=positive_float, default=0.05,
                       help="Adam learning rate (default 0.05)")
    group.add_argument("--seed", type=seed_int, default=seed,
                       help=f"seed of the uniform [0, 1) initial factors (default {seed})")
    group.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                       help="default float64, as in the notebook")


def check_device(name: str) -> torch.device:
    """The device for --device, or CliError when it cannot be used here."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device cuda: CUDA is not available (torch {torch.__version__}, "
                       f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'})")
    return torch.device(name)
