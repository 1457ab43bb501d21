"""Reading a MovieLens-25M-shaped ratings.csv with mf_ext.load_ratings: the numeric fast path
(numpy's parser) against the line-by-line parser that string ids and comments still take.
The file is synthetic (random ids, half-star ratings, timestamps), written to a temp folder.

    ./dev python benchmarks/bench_load_ratings.py [--lines 5000000] [--out F]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fix_mmap_threshold, machine_line, peak_rss_delta  # noqa: E402

from mf_ext.data import _parse_lines, load_ratings  # noqa: E402


def write_csv(path: str, lines: int) -> None:
    rng = np.random.default_rng(0)
    table = np.stack([rng.integers(1, 162_541, lines), rng.integers(1, 209_171, lines),
                      rng.integers(1, 11, lines), rng.integers(789_652_009, 1_574_327_703, lines)],
                     axis=1)
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for chunk in np.array_split(table, max(1, lines // 1_000_000)):
            f.write("".join(f"{u},{i},{r / 2:g},{t}\n" for u, i, r, t in chunk.tolist()))


def line_parser(path: str):
    with open(path, "rb") as f:
        return _parse_lines(path, f.read().decode("utf-8"), ",", "csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5_000_000)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ratings.csv")
        write_csv(path, args.lines)
        size_mb = os.path.getsize(path) / 2**20
        results = {}
        for name, fn in [("load_ratings (numeric fast path)", lambda: load_ratings(path)),
                         ("line-by-line parser", lambda: line_parser(path))]:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                data = fn()
                times.append(time.perf_counter() - start)
            results[name] = (min(times), data)
        fast, slow = (data for _, data in results.values())
        assert all(np.array_equal(getattr(fast, k), getattr(slow, k))
                   for k in ("users", "items", "ratings")), "the two parsers disagree"
        fix_mmap_threshold()  # after the timings: it slows large allocations
        peaks = [peak_rss_delta(fn) for fn in (lambda: load_ratings(path), lambda: line_parser(path))]
    base = results["line-by-line parser"][0]
    lines = [f"Machine: {machine_line()}",
             f"File: {args.lines:,} lines, {size_mb:.0f} MiB (MovieLens 25M: 25,000,095 lines, "
             "647 MiB)", "",
             "| parser | seconds (best of 3) | speed-up | peak extra memory (MiB) |",
             "|---|---:|---:|---:|"]
    for (name, (seconds, _)), peak in zip(results.items(), peaks):
        lines.append(f"| {name} | {seconds:.2f} | {base / seconds:.1f}x | {peak:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Loading a ratings file (`benchmarks/bench_load_ratings.py`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
