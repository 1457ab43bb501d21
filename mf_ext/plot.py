"""The loss curve as a PNG, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math
import os
from typing import Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_loss_curve(
    losses: Sequence[float],
    path: Union[str, "os.PathLike[str]"],
    title: str = "mf_ext: training loss",
    ylabel: str = "loss",
) -> None:
    """Writes losses[k] (the loss after k steps, k = 0 … len − 1) against k to a PNG at `path`.

    The y axis is logarithmic, unless some loss is 0 or negative (then linear). Raises OSError
    when the file cannot be written.
    """
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = range(len(losses))
    axes.plot(steps, losses, marker="." if len(losses) <= 50 else None)
    finite = [v for v in losses if math.isfinite(v)]
    axes.set_yscale("log" if finite and min(finite) > 0 else "linear")
    axes.set_xlabel("Adam steps taken")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def save_learning_curve(
    train_rmse: Sequence[float],
    val_rmse: Sequence[float],
    path: Union[str, "os.PathLike[str]"],
    title: str = "mf_ext: learning curve",
) -> None:
    """Training and validation RMSE per epoch (epochs 1 … len) to a PNG at `path`."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = range(1, len(train_rmse) + 1)
    axes.plot(epochs, train_rmse, label="training RMSE")
    if any(v is not None for v in val_rmse):
        axes.plot(epochs, [math.nan if v is None else v for v in val_rmse],
                  label="validation RMSE")
    axes.set_xlabel("epoch")
    axes.set_ylabel("RMSE")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
