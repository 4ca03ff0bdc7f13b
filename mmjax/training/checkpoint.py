"""The one checkpoint manager: Orbax, async, keep-N, holding train state + data iterator + config.

Layout of `W/checkpoints/<step>/`:
  state/   the TrainState (step, params, opt_state), sharded arrays, restorable onto any mesh
  data/    the grain iterator state, one JSON file per process
  config/  the run's config as JSON
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import MmjaxError, RuntimeFault

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(MmjaxError, ValueError):
    """A checkpoint's arrays do not fit the model the config describes."""


class NoCheckpointError(MmjaxError, FileNotFoundError):
    """A checkpoints folder holds no checkpoint."""


class MissingStepError(MmjaxError, ValueError):
    """The checkpoint step asked for is not in the checkpoints folder."""


class CheckpointWriteError(RuntimeFault, RuntimeError):
    """Writing a checkpoint failed (disk full, permission denied, ...)."""


def set_aside_incomplete(directory: str, log=print) -> list[str]:
    """Moves checkpoint folders that a crash left half-written out of the way.

    An Orbax save writes into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once
    complete, so a process killed mid-save leaves such a folder. It is moved to
    `<directory>.incomplete/` (kept for inspection, never loaded) and reported. Returns the moved names.
    """
    if not os.path.isdir(directory):
        return []
    moved = []
    for name in sorted(os.listdir(directory)):
        if TMP_MARKER in name:
            moved.append(_move_aside(directory, name))
    if moved:
        log(f"mmjax: set aside {len(moved)} incomplete checkpoint(s) left by an interrupted save: "
            f"{', '.join(moved)} -> {directory}.incomplete/")
    return moved


def _move_aside(directory: str, name: str) -> str:
    aside = directory + ".incomplete"
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, name)
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(aside, f"{name}.{suffix}")
    shutil.move(os.path.join(directory, name), target)
    return name


def _paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


class DataIteratorHandler(grain.PyGrainCheckpointHandler):
    """grain's iterator handler, restorable on another process count.

    mmjax's data-iterator state is the position in the global example stream, the same on every
    process, so when `process_<i>-of-<n>.json` for the current topology is absent, any saved
    process's file is used.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        directory = epath.Path(directory)
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            saved = sorted(directory.glob("process_*-of-*.json"))
            if not saved:
                raise ValueError(f"no data-iterator state in {directory}")
            path = saved[0]
        text = path.read_text()
        item.set_state(json.loads(text) if isinstance(item, grain.DatasetIterator) else text.encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler (the one StandardCheckpointHandler wraps; same files on disk), writing each
    replicated array from one device when this is the only process.

    Orbax's default splits a replicated array into one slice per replica, so that different hosts write
    different parts; within one host that only adds a sliced copy per device: the tiny test model's first
    save took 5.0 s with it and 0.8 s without, on 8 CPU devices. With several processes it stays on.
    """
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store  # the store Orbax's default uses
    except ImportError:  # a later Orbax moved it: keep its defaults (correct, only slower saves on one host)
        return ocp.PyTreeCheckpointHandler()
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                            array_metadata_store=array_metadata_store.Store())
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, arrays), (str, ocp.type_handlers.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves and restores train state, data-iterator state and config under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, log=print,
                 read_only: bool = False):
        """read_only: for evaluation/inference; leaves folders of interrupted saves where they are
        (they are never listed as steps)."""
        self.directory = os.path.abspath(directory)
        if jax.process_index() == 0 and not read_only:
            set_aside_incomplete(self.directory, log)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # `set_aside_incomplete` reports and keeps them
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": _state_handler(),
                "data": DataIteratorHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def choose_step(self, step: int | None = None, key: str = "") -> int:
        """`step` if this directory has a checkpoint at it, else the latest when `step` is None. Raises
        NoCheckpointError when there is none, MissingStepError (naming `key`, e.g. 'init_from.step', and the
        available steps) when `step` is not one of them."""
        steps = sorted(self.all_steps())
        if not steps:
            raise NoCheckpointError(f"no checkpoints in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            prefix = f"{key}={step}: " if key else ""
            raise MissingStepError(f"{prefix}no checkpoint at step {step} in {self.directory}; available: {steps}")
        return step

    def save(self, step: int, state, data_iterator=None, config_json: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started.

        Raises CheckpointWriteError if this save, or the previous async one, failed.
        """
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = DataIteratorSave(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(config_json)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 -- any storage failure is reported the same way
            raise self._write_error(step, e) from e

    def _write_error(self, step: int, e: Exception) -> CheckpointWriteError:
        kept = [s for s in self.all_steps() if s != step]
        return CheckpointWriteError(
            f"writing checkpoint {step} to {self.directory} failed: {type(e).__name__}: {e}. "
            f"Earlier checkpoints are untouched: {kept or 'none'}. Free space or fix permissions, "
            f"then run the same command again to resume.")

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped array."""
        meta = self.manager.item_metadata(step)["state"]
        if meta is None:
            return
        saved = {k: v for k, v in _paths(meta).items()}
        wanted = _paths(abstract_state)
        problems = []
        for k in sorted(set(wanted) - set(saved)):
            problems.append(f"missing in checkpoint: {k} {tuple(wanted[k].shape)}")
        for k in sorted(set(saved) - set(wanted)):
            problems.append(f"unexpected in checkpoint: {k} {tuple(getattr(saved[k], 'shape', ()))}")
        for k in sorted(set(saved) & set(wanted)):
            s_shape = tuple(getattr(saved[k], "shape", ()) or ())
            w_shape = tuple(wanted[k].shape)
            if s_shape != w_shape:
                problems.append(f"shape mismatch: {k} checkpoint {s_shape} vs model {w_shape}")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the model in the config "
                f"({len(problems)} problem(s)); use a fresh --workdir or the config it was trained "
                f"with:\n  {shown}{more}")

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the state onto the shardings in `abstract_state` (any mesh) and the iterator.

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set.
        Returns the restored state; `data_iterator` is restored in place.
        """
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        if data_iterator is not None and self._has_item(step, "data"):
            items["data"] = DataIteratorRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator=None, log=print):
        """Restores the newest readable checkpoint: (step, state), or (None, None) if there is none.

        A checkpoint that fails to read (truncated files, say) is reported, moved to
        `<directory>.incomplete/` and the one before it is tried. A checkpoint of another model raises
        CheckpointMismatchError: that is a config problem, not a damaged file.
        """
        for step in sorted(self.all_steps(), reverse=True):
            self.check_compatible(step, abstract_state)
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is set aside
                log(f"mmjax: checkpoint {step} is unreadable ({type(e).__name__}: {e}); "
                    f"setting it aside and trying the previous one")
                if jax.process_index() == 0:
                    _move_aside(self.directory, str(step))
                self.manager.reload()
        return None, None

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def _has_item(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))

    def wait(self) -> None:
        """Blocks until any in-flight async save is durable; raises CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self.latest_step() or -1, e) from e

    def close(self) -> None:
        self.wait()
        self.manager.close()
