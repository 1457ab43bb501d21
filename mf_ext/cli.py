"""The command line: `mf-ext <command> [options]` (also `python -m mf_ext <command>`).

Each command is a module in mf_ext/commands/ (fit_implicit.py: `fit-implicit`) with HELP (one line), add_arguments(parser) and
run(args) -> exit status; adding one (fit, recommend, info, …) is one line in COMMANDS.
Bad options exit with status 2 and user errors (bad files, bad data) with status 1, each with
a one-line message on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional, Sequence

from mf_ext.commands.errors import CliError

PROG = "mf-ext"
COMMANDS = ("demo", "fit", "fit_implicit", "recommend", "info")  # module names in mf_ext/commands/ (the
# command is the name with dashes), in the order `--help` lists them


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) that points at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; the chosen command's `run` is in `args.run`."""
    parser = _Parser(prog=PROG, description="Fast matrix factorization for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"mf_ext.commands.{name}")
        sub = subparsers.add_parser(name.replace("_", "-"), help=module.HELP,
                                    description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns its exit status (0 success, 1 user error, 2 bad options)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.run(args))
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _one_line(message: str) -> str:
    lines: List[str] = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines)
