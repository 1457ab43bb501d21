"""`mf-ext recommend MODEL USER`: the top-k items a saved model predicts for a user."""

from __future__ import annotations

import argparse

from mf_ext.commands.errors import CliError
from mf_ext.commands.options import positive_int
from mf_ext.implicit_model import ImplicitMatrixFactorization
from mf_ext.model import MatrixFactorization

HELP = "print the top-k unrated items a saved model predicts for USER"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model written by `mf-ext fit --out` or "
                                      "`mf-ext fit-implicit --out`")
    parser.add_argument("user", help="the user's raw id, as in the ratings file")
    parser.add_argument("-k", type=positive_int, default=10, help="how many items (default 10)")


def run(args: argparse.Namespace) -> int:
    try:
        model = _model_class(args.model).load(args.model)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    user = int(args.user) if model.user_map.ids.dtype.kind in "iu" and _is_int(args.user) \
        else args.user
    try:
        recs = model.recommend(user, args.k)
    except KeyError as exc:
        raise CliError(str(exc.args[0])) from None
    for rank, (item, score) in enumerate(recs, 1):
        print(f"{rank:3d}. {item}\t{score:.3f}")
    return 0


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _model_class(path: str):
    """The class that wrote the file: an implicit model's file says so (its "model" entry)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the class's load() says what is wrong with the file
        return MatrixFactorization
    if isinstance(state, dict) and state.get("model") == "ImplicitMatrixFactorization":
        return ImplicitMatrixFactorization
    return MatrixFactorization
