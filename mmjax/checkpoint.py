"""The one checkpoint manager: Orbax, async, keep-N, holding train state + data iterator + config.

Layout of `W/checkpoints/<step>/`:
  state/   the TrainState (step, params, opt_state), sharded arrays, restorable onto any mesh
  data/    the grain iterator state, one JSON file per process
  config/  the run's config as JSON
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the model the config describes."""


def _paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


class Checkpointer:
    """Saves and restores train state, data-iterator state and config under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.PyGrainCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config_json: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(config_json)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._has_item(step, "data"):
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def _has_item(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))

    def wait(self) -> None:
        """Blocks until any in-flight async save is durable."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def to_numpy_tree(tree) -> Any:
    return jax.tree.map(np.asarray, tree)
