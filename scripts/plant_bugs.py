#!/usr/bin/env python3
"""Plants known bugs one at a time and checks that the tests catch each (a test of the tests).

    scripts/plant_bugs.py [NAME ...]      (default: every mutant of scripts/mutants/*.json)

Each mutants file is a JSON list of {"name", "path", "old", "new", "tests", "why"}: in a
scratch copy of the working tree (tracked and untracked-not-ignored files, outside the repo,
kept between runs so that builds are incremental) `old` (which must occur exactly once in
`path`) becomes `new`, the extension is rebuilt if `path` is under csrc/ or is setup.py (CPU
kernels only: MF_EXT_CUDA=0; the CUDA kernels are checked through the emulation), and
`python -m pytest -x -q <tests>` runs there. A mutant is caught when pytest fails (exit 1),
MISSED when it passes (0), an error otherwise. Exits non-zero unless every mutant is caught.
Not part of CI: each mutant of csrc/ costs a rebuild (and the emulation's, ~1 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("MF_EXT_MUTANTS_DIR",
                              Path(tempfile.gettempdir()) / f"mf_ext-mutants-{REPO.name}"))


def sync_copy():
    """The scratch copy, updated to the working tree (only changed files are rewritten)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src, dst = REPO / rel, SCRATCH / rel
        if src.is_file() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def build(env):
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=SCRATCH,
                         env=env, capture_output=True, text=True)
    if run.returncode:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    return run.returncode == 0


def run_mutant(mutant, env):
    """'caught', 'MISSED' or 'error' and a line on it; the copy is restored afterwards."""
    path = SCRATCH / mutant["path"]
    original = path.read_text()
    if original.count(mutant["old"]) != 1:
        return f"error\n  `old` occurs {original.count(mutant['old'])} times in {mutant['path']}"
    rebuild = mutant["path"].startswith("csrc/") or mutant["path"] == "setup.py"
    try:
        path.write_text(original.replace(mutant["old"], mutant["new"]))
        if rebuild and not build(env):
            return "error\n  the mutant does not build"
        tests = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                "no:cacheprovider", *mutant["tests"]],
                               cwd=SCRATCH, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    outcome = {0: "MISSED", 1: "caught"}.get(tests.returncode)
    return outcome or f"error\n  pytest exit {tests.returncode}\n{tests.stdout[-2000:]}"


def main(names):
    mutants = [m for f in sorted((REPO / "scripts" / "mutants").glob("*.json"))
               for m in json.loads(f.read_text())]
    unknown = set(names) - {m["name"] for m in mutants}
    if unknown:
        sys.exit(f"plant_bugs: no mutant named {', '.join(sorted(unknown))}")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    sync_copy()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_EXT_EMU_")}
    env.update(MF_EXT_CUDA="0", PYTHONPATH=str(SCRATCH))
    if not list((SCRATCH / "mf_ext").glob("_C*.so")) and not build(env):
        sys.exit("plant_bugs: the unmutated copy does not build")
    print(f"plant_bugs: {len(mutants)} mutants, scratch copy {SCRATCH}", flush=True)
    results = {}
    for mutant in [m for m in mutants if not names or m["name"] in names]:
        outcome, _, details = run_mutant(mutant, env).partition("\n")
        results[mutant["name"]] = outcome
        print(f"{outcome:8s} {mutant['name']}: {mutant['why']}", details, sep="\n"[:bool(details)],
              flush=True)
    if any(m["path"].startswith("csrc/") for m in mutants if m["name"] in results):
        build(env)  # leave the copy's build matching the working tree
    return 0 if all(r == "caught" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
