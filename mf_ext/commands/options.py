"""argparse types and the option groups that several commands share (training options now;
fit will reuse them)."""

from __future__ import annotations

import argparse
import math

import torch

from mf_ext.commands.errors import CliError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEVICES = ("cpu", "cuda")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


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
