"""`mf-ext demo`: the reference notebook's job. Factorizes its 5×4 matrix (or --matrix FILE),
prints R next to the reconstruction PᵀQ and the final loss, and plots the loss curve."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from mf_ext.commands.errors import CliError
from mf_ext.commands.options import DTYPES, add_training_options, check_device
from mf_ext.matrix_io import load_matrix
from mf_ext.ops import masked_mf_loss
from mf_ext.plot import save_loss_curve
from mf_ext.report import format_side_by_side
from mf_ext.train import factorize

HELP = "factorize the reference notebook's 5x4 matrix (or --matrix FILE) and plot the loss"

# The notebook's rating matrix; 0 means "not observed".
NOTEBOOK_R = np.array([[1.0, 1, 0, 3], [2, 5, 0, 5], [3, 1, 2, 2], [0, 1, 3, 0], [1, 0, 3, 1]])

DEFAULT_OUT = "mf_ext_demo_loss.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matrix", metavar="FILE",
                        help="the matrix to factorize: .csv/.txt (numbers separated by commas "
                             "or spaces, '#' comments) or .npy; 0 = not observed "
                             "(default: the notebook's 5x4 matrix)")
    parser.add_argument("--out", metavar="PNG", default=DEFAULT_OUT,
                        help=f"where to write the loss curve (default {DEFAULT_OUT})")
    add_training_options(parser, steps=100, seed=0)


def run(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    device = check_device(args.device)
    dtype = DTYPES[args.dtype]
    source = args.matrix if args.matrix is not None else "the notebook's matrix"
    R_np = _load(args.matrix)
    R = torch.as_tensor(R_np).to(device=device, dtype=dtype)  # (m, n)

    try:
        result = factorize(R, rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed)
    except ValueError as exc:
        raise CliError(f"{source}: {str(exc).removeprefix('mf_ext.factorize: ')}") from None
    except NotImplementedError as exc:  # the dispatcher has no kernel for this device
        raise CliError(f"--device {args.device}: this build of mf_ext has no {args.device} "
                       f"kernel ({str(exc).splitlines()[0]})") from None
    final = float(masked_mf_loss(R, result.P, result.Q))
    if not math.isfinite(final):
        raise CliError(f"training diverged: the loss is {final} after {args.steps} steps "
                       f"(try a smaller --lr than {args.lr:g})")

    observed = result.observed.cpu().numpy()
    reconstruction = result.reconstruction().cpu().double().numpy()
    m, n = R_np.shape
    count = int(observed.sum())
    print(f"{source}: R ({m} x {n}, {count} observed) ~ P^T Q with rank {args.rank}; "
          f"{args.steps} Adam steps, lr {args.lr:g}, seed {args.seed}, {args.dtype} on {device}")
    print()
    print(format_side_by_side(R_np, reconstruction, observed))
    print()
    curve = result.losses + [final]  # curve[k]: the loss after k steps
    print(f"final loss: {final:.10g} (sum of squared errors over the {count} observed entries; "
          f"{curve[0]:.6g} before training)")
    try:
        save_loss_curve(curve, out, title=f"mf_ext demo: rank {args.rank}, lr {args.lr:g}",
                        ylabel="loss (sum of squared errors, observed entries)")
    except OSError as exc:
        raise CliError(f"--out {out}: cannot write the loss curve ({exc.strerror or exc})"
                       ) from None
    print(f"loss curve: {out}")
    return 0


def _check_out(path: str) -> Path:
    """--out as a Path, checked before training so a bad path fails fast."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {path}: the loss curve is a PNG; give a path ending in .png")
    if not out.parent.is_dir():
        raise CliError(f"--out {path}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise CliError(f"--out {path}: is a folder, not a file name")
    return out


def _load(path: "str | None") -> np.ndarray:
    """The matrix (m, n): the notebook's, or the one in `path`."""
    if path is None:
        return NOTEBOOK_R.copy()
    try:
        return load_matrix(path)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
