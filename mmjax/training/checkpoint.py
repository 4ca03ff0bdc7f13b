"""The one checkpoint manager: Orbax, async, keep-N, holding train state + data iterator + config, verified.

Layout of `W/checkpoints/<step>/`:
  state/      the TrainState (step, params, opt_state), sharded arrays, restorable onto any mesh
  data/       the grain iterator state, one JSON file per process
  config/     the run's config as JSON
  integrity/  the checksums of all of the above (`mmjax.training.integrity`), the record's SHA-256 in the
              checkpoint's `_CHECKPOINT_METADATA` (a damaged record is told from damaged arrays)

A save refuses a state holding NaN or Inf. A restore checks the metadata, recomputes every leaf's checksums and
compares; a checkpoint that fails (wrong values, unreadable or missing files, damaged metadata) is never loaded:
`restore` raises CheckpointDamagedError naming the step and the leaves, and `restore_latest` sets it aside
(`<directory>.damaged/`) and falls back to the previous one. Pre-checksum checkpoints load unverified, with a
note. Old checkpoints are deleted (keep-N) only once the newest save is durable and its metadata checks out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax import storage
from mmjax.errors import MmjaxError, RuntimeFault
from mmjax.runtime import distributed
from mmjax.training import integrity, orbax_quiet
from mmjax.training.integrity import CheckpointDamagedError

TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_SUCCESS = "commit_success.txt"  # the last file of a checkpoint Orbax writes in place (gs://)


class CheckpointMismatchError(MmjaxError, ValueError):
    """A checkpoint's arrays do not fit the model the config describes."""


class NoCheckpointError(MmjaxError, FileNotFoundError):
    """A checkpoints folder holds no checkpoint."""


class MissingStepError(MmjaxError, ValueError):
    """The checkpoint step asked for is not in the checkpoints folder."""


class CheckpointWriteError(RuntimeFault, RuntimeError):
    """Writing a checkpoint failed (disk full, permission denied, ...)."""


class NonFiniteStateError(RuntimeFault, ValueError):
    """A save was asked for a state holding NaN or Inf: nothing was written."""


class NoVerifiedCheckpointError(RuntimeFault, FileNotFoundError):
    """A checkpoints folder holds checkpoints, but none of them passed verification."""


class UnsupportedCheckpointLocationError(MmjaxError, ValueError):
    """Checkpoints cannot be written where asked (an s3:// folder: Orbax has no S3 storage)."""


def check_location(directory: str) -> None:
    """Refuses a checkpoint folder Orbax cannot use, before anything is written: an s3:// URL (Orbax 0.12.8
    would write the arrays to a local folder named 's3:'). Data, tokenizer files and specs may stay on s3://."""
    if storage.scheme(directory) == "s3":
        raise UnsupportedCheckpointLocationError(
            f"checkpoints cannot go to {directory}: Orbax (the checkpoint library) has no S3 storage and would "
            f"write them to a local folder named 's3:'; use a gs:// or a local / network-disk (NFS, Lustre) "
            f"--workdir (data, specs and tokenizer files can stay on s3://)")
    storage.check(directory)


def is_incomplete(directory: str, name: str) -> bool:
    """Whether `directory/name` is a checkpoint folder a crash left half-written. On a disk Orbax writes into
    `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` once complete. On gs:// (no atomic folder rename) it
    writes `<step>` in place and adds `commit_success.txt` last, so a step folder without that file is unfinished."""
    if TMP_MARKER in name:
        return True
    return (storage.scheme(directory) == "gs" and name.isdigit()
            and not storage.exists(storage.join(directory, name, COMMIT_SUCCESS)))


def set_aside_incomplete(directory: str, log=print) -> list[str]:
    """Moves half-written checkpoint folders (`is_incomplete`) to `<directory>.incomplete/` (kept, never loaded)
    and reports them. Returns the moved names."""
    moved = []
    for name in storage.listdir(directory):
        if is_incomplete(directory, name):
            _move_aside(directory, name)
            moved.append(name)
    if moved:
        log(f"mmjax: set aside {len(moved)} incomplete checkpoint(s) left by an interrupted save: "
            f"{', '.join(moved)} -> {directory}.incomplete/")
    return moved


def _move_aside(directory: str, name: str, suffix: str = ".incomplete") -> str:
    """Moves `directory/name` into `directory<suffix>/` (never over an earlier one); returns where it went."""
    aside = directory.rstrip("/") + suffix
    storage.makedirs(aside)
    target = storage.join(aside, name)
    n = 0
    while storage.exists(target):
        n += 1
        target = storage.join(aside, f"{name}.{n}")
    storage.rename(storage.join(directory, name), target)
    return target


def _with_unknown_bound(abstract_state, state):
    """A restored state as `abstract_state` asks for it: a TrainState's carried bound (not saved) is the unknown
    one (inf), on the bound's sharding, so that the first step checks its update exactly and measures the state."""
    bound = getattr(abstract_state, "bound", None)
    if bound is None or not hasattr(abstract_state, "saved"):
        return state
    sharding = getattr(bound, "sharding", None)
    value = np.full(bound.shape, np.inf, bound.dtype)
    placed = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i]) if sharding else jnp.array(value)
    return abstract_state.replace(step=state.step, params=state.params, opt_state=state.opt_state, bound=placed)


def _iterator_text(item) -> str:
    """The data-iterator state as the JSON text written to `data/process_<i>-of-<n>.json`."""
    if isinstance(item, str):
        return item
    if isinstance(item, grain.DatasetIterator):
        return json.dumps(item.get_state(), indent=4)
    return item.get_state().decode()


def _data_hashes(text: str | None) -> dict[str, str] | None:
    """{'process_<i>-of-<n>.json': SHA-256 of the text process i writes} (a collective on several processes: each
    process's data-iterator state may differ, and process 0 writes the record)."""
    if text is None:
        return None
    digest = integrity.sha256(text)
    count = jax.process_count()
    if count == 1:
        return {"process_0-of-1.json": digest}
    everyone = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return {f"process_{i}-of-{count}.json": bytes(np.asarray(row, np.uint8)).hex() for i, row in
            enumerate(np.asarray(everyone).reshape(count, -1))}


def _set_iterator_state(item, text: str):
    item.set_state(json.loads(text) if isinstance(item, grain.DatasetIterator) else text.encode())
    item.start_prefetch()
    return item


class DataIteratorHandler(grain.PyGrainCheckpointHandler):
    """grain's iterator handler, restorable on another process count, saving a text prepared in advance.

    mmjax's data-iterator state is the position in the global example stream, the same on every process, so when
    `process_<i>-of-<n>.json` for the current topology is absent, any saved process's file is used. `save` takes
    the iterator or its state's text (`_iterator_text`), so the text checksummed is the text written.
    """

    def save(self, directory, item=None, args=None):
        item = item if item is not None else args.item
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(_iterator_text(item))

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        directory = epath.Path(directory)
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            saved = sorted(directory.glob("process_*-of-*.json"))
            if not saved:
                raise ValueError(f"no data-iterator state in {directory}")
            path = saved[0]
        return _set_iterator_state(item, path.read_text())


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
    """Saves and restores train state, data-iterator state and config under `directory`, with checksums."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, log=print,
                 read_only: bool = False):
        """keep: how many checkpoints to keep (the newest; deleted only after a newer save is durable).
        read_only: for evaluation/inference; leaves folders of interrupted saves and checkpoints that fail
        verification where they are (they are never loaded)."""
        check_location(directory)
        self.directory = storage.absolute(directory)
        self.keep, self.log, self.read_only, self._async = keep, log, read_only, async_save
        self._pending: int | None = None  # the step of the save in flight
        self._failed = False  # a save failed (and was reported): later waits do not report it again
        orbax_quiet.install()
        if jax.process_index() == 0 and not read_only:
            set_aside_incomplete(self.directory, log)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # `_prune` deletes, once the newest save is durable (Orbax would delete at once)
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
                "integrity": ocp.JsonCheckpointHandler(),
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

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, step: int, state, data_iterator=None, config_json: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step` with its checksums; returns whether a save was started.

        Raises NonFiniteStateError (nothing written) if `state` holds NaN or Inf (read, unless the train step's
        carried bound proves it finite: `TrainState.proven_finite`), CheckpointWriteError (naming the step whose
        save failed) if this save, or the previous async one, failed.
        """
        self._finish_pending()
        if not force and not self.manager.should_save(step):
            return False
        known_finite = bool(getattr(state, "proven_finite", lambda: False)())  # the step's bound proves it finite
        state = integrity.checkpointed(state)  # a TrainState's carried bound is not saved
        summary = integrity.summarize(state, known_finite=known_finite)
        bad = integrity.nonfinite(summary)
        if bad:
            kept = sorted(self.all_steps())
            raise NonFiniteStateError(
                f"not saving checkpoint {step}: the state holds NaN or Inf in {len(bad)} array(s) "
                f"({integrity.short_list(bad)}); nothing was written and the earlier checkpoints are kept "
                f"({kept or 'none'}). Run the same command to resume from the last one; if it diverges again, "
                f"lower optim.lr or check the data before step {step}.")
        data_text = None if data_iterator is None else _iterator_text(data_iterator)
        record = integrity.make_record(step, summary, _data_hashes(data_text), config_json)
        items = {"state": ocp.args.PyTreeSave(state), "integrity": ocp.args.JsonSave(record)}
        if data_text is not None:
            items["data"] = DataIteratorSave(data_text)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(config_json)
        marker = {integrity.MARKER_KEY: {"format": integrity.FORMAT, "sha256": integrity.digest(record)}}
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                        custom_metadata=marker)
        except Exception as e:  # noqa: BLE001 -- any storage failure is reported the same way
            self._failed = True
            raise self._write_error(step, e) from e
        if started:
            self._pending = step
            if not self._async:
                self._finish_pending()
        return started

    def _finish_pending(self) -> None:
        """Waits for the save in flight; then (it is durable) deletes checkpoints beyond `keep`."""
        step, self._pending = self._pending, None
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- a failure of the background save, reported for its step
            self._failed = True
            raise self._write_error(step, e) from e
        if step is not None:
            self._prune(step)

    def _prune(self, newest: int) -> None:
        """Deletes the oldest checkpoints beyond `keep`, once checkpoint `newest` is durable and its metadata
        checks out (never `newest` itself, nor anything newer)."""
        steps = sorted(self.all_steps())
        if not storage.isdir(storage.join(self.directory, str(newest))):  # Orbax logs some failures and goes on
            self._failed = True
            kept = [s for s in steps if s != newest]
            raise CheckpointWriteError(
                f"writing checkpoint {newest} to {self.directory} did not complete (no {newest}/ after the save); "
                f"earlier checkpoints are untouched: {kept or 'none'}. Check the storage, then run the same command "
                f"again to resume.")
        problems = self._metadata_problems(newest)
        if distributed.any_process(bool(problems)):
            self.log(f"mmjax: checkpoint {newest} does not check out after its save ({'; '.join(problems)}); "
                     f"keeping every older checkpoint")
            return
        if self.read_only or not self.keep or self.keep < 1:
            return
        for step in [s for s in steps if s < newest][:max(0, len(steps) - self.keep)]:
            self.manager.delete(step)

    def _write_error(self, step: int | None, e: Exception) -> CheckpointWriteError:
        kept = [s for s in self.all_steps() if s != step]
        reported = orbax_quiet.take_errors()
        more = f" ({len(reported)} Orbax error log(s) of it hidden; MMJAX_DEBUG=1 shows them)" if reported else ""
        which = f"checkpoint {step}" if step is not None else "a checkpoint"
        return CheckpointWriteError(
            f"writing {which} to {self.directory} failed: {orbax_quiet.describe(e)}{more}. Earlier checkpoints are "
            f"untouched: {kept or 'none'}. Free space or fix permissions, then run the same command again to resume.")

    # ----------------------------------------------------------------------------------------- verification

    def _damaged(self, step: int, problems: list[str]) -> CheckpointDamagedError:
        return CheckpointDamagedError(self.directory, step, problems)

    def _metadata_problems(self, step: int) -> list[str]:
        try:
            integrity.read_record(self.directory, step)
        except CheckpointDamagedError as e:
            return e.problems
        return []

    def check_compatible(self, step: int, abstract_state, record: dict | None = None) -> None:
        """Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped array, or
        CheckpointDamagedError when the checkpoint's array metadata disagrees with its checksum record."""
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 -- unreadable metadata is damage, not a config problem
            raise self._damaged(step, [f"state metadata unreadable ({orbax_quiet.describe(e)})"]) from e
        saved_meta = {k: tuple(getattr(v, "shape", ()) or ()) for k, v in integrity.leaf_paths(meta).items()}
        if record is not None:
            saved = integrity.shapes(record)
            if meta is not None and saved_meta != saved:
                raise self._damaged(step, ["state/_METADATA does not match the checksum record"])
        elif meta is None:
            return
        else:
            saved = saved_meta
        wanted = {k: tuple(v.shape) for k, v in integrity.leaf_paths(abstract_state).items()}
        self._compare_shapes(step, saved, wanted)

    def _compare_shapes(self, step: int, saved: dict, wanted: dict) -> None:
        problems = [f"missing in checkpoint: {k} {wanted[k]}" for k in sorted(set(wanted) - set(saved))]
        problems += [f"unexpected in checkpoint: {k} {saved[k]}" for k in sorted(set(saved) - set(wanted))]
        problems += [f"shape mismatch: {k} checkpoint {saved[k]} vs model {wanted[k]}"
                     for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the model in the config "
                f"({len(problems)} problem(s)); use a fresh --workdir or the config it was trained "
                f"with:\n  {shown}{more}")

    # ------------------------------------------------------------------------------------------- restoring

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the state onto the shardings in `abstract_state` (any mesh) and the iterator, verified.

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set.
        Returns the restored state; `data_iterator` is restored in place (only once the state verified).
        Raises CheckpointDamagedError (naming the step and what failed) when the checkpoint fails verification,
        CheckpointMismatchError when it holds another model's arrays.
        """
        record = integrity.read_record(self.directory, step)
        self.check_compatible(step, abstract_state, record)
        integrity.read_config(self.directory, step, record)
        data_text = integrity.read_data_text(self.directory, step, record)  # checked even if unused: all or nothing
        wanted, abstract_state = abstract_state, integrity.checkpointed(abstract_state)
        args = ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:  # noqa: BLE001 -- whatever fails to read is damage
            raise self._damaged(step, [f"unreadable ({orbax_quiet.describe(e)})"]) from e
        finally:
            orbax_quiet.take_errors()
        problems = integrity.state_problems(record, integrity.summarize(state))  # on the state's devices
        if problems:
            raise self._damaged(step, problems)
        if record is None:
            self.log(f"mmjax: note: checkpoint {self.directory}/{step} was written before checkpoints carried "
                     f"checksums; loaded unverified (checked for NaN/Inf only)")
        if data_iterator is not None and data_text is not None:
            _set_iterator_state(data_iterator, data_text)
        return _with_unknown_bound(wanted, state)

    def restore_latest(self, abstract_state, data_iterator=None, log=None):
        """Restores the newest checkpoint that verifies: (step, state), or (None, None) if there is none.

        A checkpoint that fails verification (damaged arrays or metadata, unreadable files) is reported, set
        aside in `<directory>.damaged/` (left in place when read-only) and the one before it is tried;
        NoVerifiedCheckpointError if none verifies. A checkpoint of another model raises
        CheckpointMismatchError: that is a config problem, not a damaged file.
        """
        log = log or self.log
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            state, error = None, None
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- any checkpoint that fails is set aside
                error = e
            if not distributed.any_process(error is not None):  # all processes agree on the outcome
                if failed:
                    log(f"mmjax: falling back to checkpoint {step}, the newest that verified")
                return step, state
            why = "; ".join(error.problems if isinstance(error, CheckpointDamagedError) else
                            [orbax_quiet.describe(error) if error else "it failed on another process"])
            failed.append(f"{step} ({why})")
            log(f"mmjax: checkpoint {step} failed verification: {why}; {self._set_aside(step)}; "
                f"trying the previous one")
        if failed:
            aside = "" if self.read_only else (f"; they were set aside in {self.directory}.damaged/ and a new run "
                                               f"starts from step 0")
            raise NoVerifiedCheckpointError(f"no checkpoint in {self.directory} passed verification: "
                                            f"{', '.join(failed)}{aside}")
        return None, None

    def _set_aside(self, step: int) -> str:
        """Moves checkpoint `step`, which failed verification, to `<directory>.damaged/` (kept for inspection,
        never loaded; not when read-only). Returns where it is, for the message."""
        if self.read_only:
            return "left in place (read-only)"
        where = f"set aside in {self.directory}.damaged/"
        if jax.process_index() == 0:
            where = f"set aside as {_move_aside(self.directory, str(step), '.damaged')}"
        self.manager.reload()
        return where

    def restore_config(self, step: int) -> dict:
        """The config saved with checkpoint `step`, verified against its checksum."""
        config_json = integrity.read_config(self.directory, step, integrity.read_record(self.directory, step))
        if config_json is None:
            raise self._damaged(step, ["it holds no config item"])
        return config_json

    def wait(self) -> None:
        """Blocks until any in-flight async save is durable (then applies keep-N); raises CheckpointWriteError,
        naming the step, if it failed."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._failed:  # Orbax would raise the reported failure again
                with contextlib.suppress(Exception):
                    self.manager.close()
            else:
                self.manager.close()
