"""What mf_ext's recommenders share: settings in a Config dataclass (readable and writable as
attributes of the model), the epoch loop with early stopping and a progress bar, and saving to /
loading from a file that holds tensors and plain values only."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type

import numpy as np
import torch

from mf_ext.config import Config
from mf_ext.progress import progress_bar
from mf_ext.shard_files import load_shards, save_shards, write_atomically

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class EpochRecord:
    epoch: int
    train_rmse: float
    val_rmse: Optional[float]
    seconds: float


class Estimator:
    """Base of the models. A subclass sets `Config` (a Config dataclass whose fields are the
    constructor's arguments, in order; the epoch loop reads its `epochs` and `patience`, and
    save/load its `dtype` and `device`) and `FORMAT_VERSION`, and implements `_state()` and
    `_restore(state, device)` for the tensors and values its saved file holds beyond the
    config, dtype and history, and, if it can be fitted with sharded rows, SHARDED_STATE: which
    of those tensors a sharded model splits by rows (mf_ext/shard_files.py). Files of versions
    OLDEST_FORMAT_VERSION..FORMAT_VERSION load; `_restore` and Config.OLD_FILE_DEFAULTS give the
    older ones their old meaning."""

    Config: ClassVar[Type[Config]]
    FORMAT_VERSION: ClassVar[int]
    OLDEST_FORMAT_VERSION: ClassVar[int] = 1  # older files than this are refused
    SHARDED_STATE: ClassVar[Dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # help() and inspect show the settings as the arguments
            cls.__signature__ = inspect.signature(cls.Config).replace(
                return_annotation=inspect.Signature.empty)

    def __init__(self, *args: Any, **settings: Any):
        self.__dict__["config"] = self.Config(*args, **settings)
        self.history: List[EpochRecord] = []
        self.interrupted = False
        self._fitted = False
        self.shard = None  # after a fit with shard_factors=True: this rank's rows (ShardInfo)

    @property
    def _who(self) -> str:
        return self.Config.WHO

    # The settings read and write through to self.config, so that there is one copy of them.
    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in config.names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("config")
        if config is not None and name in config.names():
            setattr(config, name, value)
        else:
            object.__setattr__(self, name, value)

    def _check_fitted(self, whole: bool = True) -> None:
        """Fitted or loaded; and, if `whole`, not a shard (the methods that need every row)."""
        if not self._fitted:
            raise RuntimeError(f"{self._who}: call fit() (or load()) first")
        if whole and self.shard is not None:
            raise RuntimeError(f"{self._who}: this model holds only rank {self.shard.rank} of "
                               f"{self.shard.world_size}'s rows of the factors (shard_factors="
                               f"True); save() it on every rank and load() the file to predict "
                               f"or recommend (evaluate() works on the shards, as a collective)")

    # ------------------------------------------------------------------ the epoch loop

    def _run_epochs(self, params: Sequence[torch.Tensor], train_epoch: Callable[[], float],
                    validate: Callable[[], Optional[float]], progress: bool,
                    callback: Optional[Callable[[EpochRecord], None]]) -> None:
        """Up to `epochs` epochs of `train_epoch()` (returns the training MSE); after each,
        `validate()` (the validation RMSE or None). Stops after `patience` epochs without a
        better validation RMSE and restores the best epoch's `params`. Ctrl-C stops too (the
        best parameters so far are kept; `interrupted` is then True)."""
        self.history, self.interrupted = [], False
        best_rmse, best_state, best_epoch = math.inf, None, 0
        bar = progress_bar(self.epochs, "fit", "epoch", enabled=progress)
        try:
            for epoch in range(1, self.epochs + 1):
                start = time.perf_counter()
                train_mse = train_epoch()
                val_rmse = validate()
                record = EpochRecord(epoch, math.sqrt(max(train_mse, 0.0)), val_rmse,
                                     time.perf_counter() - start)
                self.history.append(record)
                # The best state first, so that an interrupt in the callback or the progress
                # bar still counts this epoch.
                stop = False
                if val_rmse is not None:
                    if val_rmse < best_rmse - 1e-6:
                        best_rmse, best_epoch = val_rmse, epoch
                        best_state = [p.detach().clone() for p in params]
                    else:
                        stop = epoch - best_epoch >= self.patience
                if callback is not None:
                    callback(record)
                bar.update(1)
                bar.set_postfix(train=f"{record.train_rmse:.4f}",
                                val="-" if val_rmse is None else f"{val_rmse:.4f}",
                                refresh=False)
                if stop:
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            bar.close()
        if best_state is not None:
            with torch.no_grad():
                for p, best in zip(params, best_state):
                    p.copy_(best)
        self.best_epoch = best_epoch if best_state is not None else len(self.history)
        for p in params:
            p.requires_grad_(False)

    # ------------------------------------------------------------------ persistence

    def _state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _restore(self, state: Dict[str, Any], device: str) -> None:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the model atomically (a temporary file in the same folder, then a rename),
        so an interrupted save never leaves a broken file. A model fitted with
        shard_factors=True is saved by all ranks together (a collective): a file per rank and a
        manifest at `path`, which load() reads as one model (mf_ext/shard_files.py)."""
        self._check_fitted(whole=False)
        state = {"format_version": self.FORMAT_VERSION, "config": self.config.saved(),
                 "dtype": str(self.dtype).replace("torch.", ""), **self._state(),
                 "history": [{k: _plain(v) for k, v in vars(h).items()} for h in self.history]}
        if self.shard is not None:
            save_shards(state, path, self.shard, self.SHARDED_STATE, f"{self._who}.save",
                        (len(self.history), getattr(self, "best_epoch", None)))
        else:
            write_atomically(state, path)

    @classmethod
    def load(cls, path: str, device: str = "cpu"):
        """A model written by save(). Refuses files of another format version clearly. The file
        is read with torch.load(weights_only=True): tensors and plain Python values only, so
        opening an untrusted file cannot run code."""
        who = f"{cls.Config.WHO}.load"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{who}: no such file {path!r}") from None
        except Exception as exc:
            raise ValueError(f"{who}: {path!r} is not an mf_ext model "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError(f"{who}: {path!r} is not an mf_ext model")
        if state["format_version"] not in range(cls.OLDEST_FORMAT_VERSION,
                                                cls.FORMAT_VERSION + 1):
            raise ValueError(f"{who}: {path!r} has model format version "
                             f"{state['format_version']}, this mf_ext reads versions "
                             f"{cls.OLDEST_FORMAT_VERSION} to {cls.FORMAT_VERSION}; refit or use "
                             f"a matching mf_ext")
        if "shards" in state:  # the manifest of a sharded save
            state = load_shards(state, path, cls.SHARDED_STATE, who)
        dtype = _DTYPES.get(state.get("dtype"))
        if dtype is None:
            raise ValueError(f"{who}: {path!r} has an unknown dtype {state.get('dtype')!r}")
        try:
            config = cls.Config.from_saved(dict(state["config"]), device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{who}: {path!r} holds bad settings: {exc}") from None
        model = cls.__new__(cls)
        model.__dict__["config"] = config
        model._restore(state, device)
        model.history = [EpochRecord(**h) for h in state["history"]]
        model.interrupted, model._fitted, model.shard = False, True, None
        return model


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, so that a saved model holds nothing but tensors and plain
    values (what torch.load(weights_only=True) accepts)."""
    return value.item() if isinstance(value, np.generic) else value


def ids_to_file(ids: np.ndarray):
    """Integer ids as an int64 tensor, any others as a list of str."""
    if ids.dtype.kind in "iu":
        return torch.from_numpy(ids.astype(np.int64))
    return [str(x) for x in ids.tolist()]


def ids_from_file(ids) -> np.ndarray:
    return ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=str)
