"""The progress bar of the training loops (tqdm, when installed) and log lines that do not tear
it. Without tqdm, or with progress off, a bar whose methods do nothing stands in."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class _NoBar:
    """tqdm's interface, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar over `total` units, or a do-nothing stand-in when not `enabled` or without
    tqdm (progress is optional)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)


def write_line(line: str, file: TextIO = None) -> None:
    """A log line (default: on stderr) printed above the progress bar rather than through it."""
    file = sys.stderr if file is None else file
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line, file=file, flush=True)
        return
    tqdm.write(line, file=file)
