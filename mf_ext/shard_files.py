"""Saving a model whose rows are sharded across torch.distributed ranks (shard_factors=True), and
loading it back whole.

`save_shards` is a collective: every rank writes its rows to PATH.<token>.shard<k>-of-<P>, then
rank 0 writes the manifest at PATH (the model file without the sharded tensors, plus the list of
shard files and the rows each holds). Every file is written atomically (a temporary file, then a
rename) and the manifest last, so a reader of PATH sees a complete model or the previous one;
the token, new on each save, keeps a save from overwriting the shards an older manifest lists.
`load_shards` reads the manifest's shard files (from PATH's folder) and joins them.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

SHARD_FORMAT = "mf_ext model shard"


def write_atomically(state: Dict[str, Any], path: str) -> None:
    """torch.save to a temporary file in the same folder, then a rename, so an interrupted save
    never leaves a broken file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mf_ext-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_shards(state: Dict[str, Any], path: str, shard, layout: Dict[str, Tuple[str, Any]],
                who: str, fit: Any) -> None:
    """Writes `state` (a model file's dict, with this rank's rows of the `layout` keys) as one
    shard file per rank plus the manifest at `path` (module docstring). `shard`: the model's
    ShardInfo; `fit`: what must be equal on all ranks for the shards to be of one model (the
    fit's epochs and best epoch). A collective; raises on every rank when any rank failed."""
    rank, world = shard.rank, shard.world_size
    if not (dist.is_available() and dist.is_initialized()) or (
            dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"{who}: this model holds rank {rank} of {world}'s rows: all {world} "
                           f"ranks of the process group it was fitted in must save it together")
    token = _agree(secrets.token_hex(4), who, "shard-save token")[0]  # rank 0's, for all
    folder, base = os.path.split(os.path.abspath(path))
    names = [f"{base}.{token}.shard{k}-of-{world}" for k in range(world)]
    mine = os.path.join(folder, names[rank])
    rows = (list(shard.users), list(shard.items))
    outcomes = _all_or_none(
        lambda: write_atomically({"format": SHARD_FORMAT, "token": token, "rank": rank,
                                  "world_size": world, "users": rows[0], "items": rows[1],
                                  **{key: state[key] for key in layout}}, mine),
        mine, who, "shard write", (fit, rows))

    def write_manifest() -> None:
        old = _listed_shards(path)
        manifest = {key: value for key, value in state.items() if key not in layout}
        manifest["shards"] = [{"file": names[k], "users": users, "items": items}
                              for k, (_, (_, (users, items))) in enumerate(outcomes)]
        manifest["n_users"], manifest["n_items"] = shard.n_users, shard.n_items
        write_atomically(manifest, path)
        for name in set(old) - set(names):  # the shards of the model this save replaced
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass

    _all_or_none(write_manifest if rank == 0 else lambda: None, None, who, "manifest write",
                 None)


def load_shards(manifest: Dict[str, Any], path: str, layout: Dict[str, Tuple[str, Any]],
                who: str) -> Dict[str, Any]:
    """The whole model's state from a manifest (read from `path`) and its shard files."""
    folder = os.path.dirname(os.path.abspath(path))
    shards, state = manifest["shards"], dict(manifest)
    del state["shards"]
    extents = {"users": state.pop("n_users"), "items": state.pop("n_items")}
    parts: Dict[str, List[torch.Tensor]] = {key: [] for key in layout}
    reached = {"users": 0, "items": 0}
    for k, entry in enumerate(shards):
        file = os.path.join(folder, entry["file"])
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{who}: {path!r} is a sharded model whose shard file "
                             f"{entry['file']!r} is missing (it must lie beside the manifest)"
                             ) from None
        except Exception as exc:
            raise ValueError(f"{who}: {path!r} lists the shard file {entry['file']!r}, which is "
                             f"not an mf_ext model shard ({type(exc).__name__}: {exc})") from None
        if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT or \
                shard.get("rank") != k or len(shards) != shard.get("world_size"):
            raise ValueError(f"{who}: {entry['file']!r} is not shard {k} of {len(shards)} of "
                             f"{path!r}")
        for kind in ("users", "items"):
            if list(shard[kind]) != list(entry[kind]) or entry[kind][0] != reached[kind]:
                raise ValueError(f"{who}: the shards of {path!r} do not tile the {kind}: shard "
                                 f"{k} holds {list(shard[kind])}, expected it to start at "
                                 f"{reached[kind]}")
            reached[kind] = entry[kind][1]
        for key in layout:
            parts[key].append(shard.get(key))  # None: a tensor this model has not (Y without
            # the SVD++ term), or one that shards written before it was sharded did not hold
    if reached != extents:
        raise ValueError(f"{who}: the shards of {path!r} hold {reached} rows, the manifest "
                         f"says {extents}")
    for key, (_, join) in layout.items():
        missing = [k for k, part in enumerate(parts[key]) if part is None]
        if len(missing) == len(shards):
            state.setdefault(key, None)  # the manifest's value (None) if it has the key
            continue
        if missing:
            raise ValueError(f"{who}: the shards {missing} of {path!r} hold no {key!r}, the "
                             f"others do: they are not of one model")
        state[key] = _join_csr_indptr(parts[key]) if join == "indptr" else \
            torch.cat(parts[key], dim=join)
    return state


def _join_csr_indptr(parts: List[torch.Tensor]) -> torch.Tensor:
    """One CSR row-pointer array from those of consecutive row blocks."""
    out, offset = [parts[0][:1] * 0], 0
    for indptr in parts:
        out.append(indptr[1:] + offset)
        offset += int(indptr[-1])
    return torch.cat(out)


def _listed_shards(path: str) -> List[str]:
    """The shard files that the sharded model now at `path` lists (none if it is not one)."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
        return [entry["file"] for entry in old.get("shards", [])]
    except Exception:
        return []


def _agree(value: Any, who: str, what: str) -> List[Any]:
    """Every rank's `value` in rank order (an all-gather); a value of rank 0 for all as [0]."""
    out: List[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, value)
    except RuntimeError as exc:
        raise RuntimeError(f"{who}: rank {dist.get_rank()} of {dist.get_world_size()}: the {what} "
                           f"all-gather failed; another rank probably raised an error or stopped "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    return out


def _all_or_none(write, written: Optional[str], who: str, what: str, check: Any) -> list:
    """Runs `write` here and tells the ranks each other's outcome: when it failed on any rank, or
    `check[0]` (a value that must agree: the fit) differs between ranks, every rank removes its
    file `written` (if given) and raises. Returns every rank's (error, check)."""
    try:
        write()
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    outcomes = _agree((error, check), who, what)
    failed = {k: e for k, (e, _) in enumerate(outcomes) if e is not None}
    if not failed and len({repr(c[0]) for _, c in outcomes if c is not None}) > 1:
        failed = {k: f"its fit ended after {c[0][0]} epochs (best epoch {c[0][1]})"
                  for k, (_, c) in enumerate(outcomes)}
    if failed:
        if written is not None and os.path.exists(written):
            os.unlink(written)
        raise RuntimeError(f"{who}: the sharded save failed ({what}): " + "; ".join(
            f"rank {k}: {e}" for k, e in sorted(failed.items())))
    return outcomes
