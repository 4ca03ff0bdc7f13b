"""Checksums of what a checkpoint holds, so a restore can tell a damaged checkpoint from a good one.

Every array leaf of the TrainState (step, params, each part of the optimizer state) gets two 32-bit checksums,
computed where the array lives, without gathering it to one host: the leaf's bits are read as 32-bit words
(`bitcast`; 8- and 16-bit types widened, 64-bit ones split in two) and reduced under `jit` to their sum and their
position-weighted sum (word i, in row-major order over the whole leaf, weighs A*i + B, an odd number), both
modulo 2**32. Each device sums its own block of a sharded leaf (`shard_map`, with the block's global positions)
and the blocks' sums are added across devices and hosts (`psum`); integer sums wrap exactly whatever the order, so
every process gets the same figures, on any mesh the state is restored onto. A changed word changes the plain
sum; two words swapped, the weighted one. The same program tells whether each floating-point leaf is finite. The
data-iterator state and the config are small JSON texts: a SHA-256 of them. A TrainState's carried bound is not
part of a checkpoint (`checkpointed`).

The record (`make_record`) is saved as the checkpoint's `integrity` item; `compare` lists the leaves of a restored
state that do not match it. The measured cost is in docs/reliability.md (benchmarks/checksum_cost.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import storage
from mmjax.errors import RuntimeFault
from mmjax.training.orbax_quiet import describe

FORMAT = "mmjax-integrity-1"
MARKER_KEY = "mmjax_integrity"  # in `_CHECKPOINT_METADATA`'s custom metadata: {'format', 'sha256' of the record}
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
ALGORITHM = "per leaf: sum and sum weighted by (0x3C6EF362 * i + 0x7F4A7C15) of the 32-bit words, mod 2**32"
_WEIGHT_A, _WEIGHT_B = 0x3C6EF362, 0x7F4A7C15  # word i weighs A*i + B: A even (2 x the golden ratio's), B odd


class CheckpointDamagedError(RuntimeFault, ValueError):
    """A checkpoint failed verification (values that do not match their checksums, unreadable or missing files,
    damaged metadata, NaN/Inf): it is not loaded. `step` and `problems` say which and why."""

    def __init__(self, directory: str, step: int, problems: list[str]):
        self.step, self.problems = step, list(problems)
        super().__init__(f"checkpoint {directory}/{step} failed verification and was not loaded: "
                         f"{'; '.join(self.problems)}")


def checkpointed(tree):
    """What a checkpoint holds of `tree`: a TrainState's `saved()` part (all but its carried bound), else `tree`."""
    saved = getattr(tree, "saved", None)
    return saved() if callable(saved) else tree


def leaf_paths(tree) -> dict[str, Any]:
    """{'params/image/...': leaf} for every leaf a checkpoint holds of `tree` (`checkpointed`; the names the
    checkpoint's messages use)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(checkpointed(tree))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (a trailing axis of 2 for 64-bit types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if bits in (8, 16):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"cannot checksum an array of {x.dtype}")


def _global_index(shape: tuple[int, ...], offsets: list, global_shape: tuple[int, ...]) -> jax.Array:
    """The row-major position (mod 2**32) in an array of `global_shape` of each element of a block of `shape`
    whose first element sits at `offsets`."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        position = jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + offsets[axis]
        index = index + position * jnp.uint32(stride % 2**32)
        stride *= global_shape[axis]
    return index


_FOLD = 16


def _column_sums(words: jax.Array) -> jax.Array:
    """Sums over every axis but the last, by adding 16 blocks of rows elementwise, again until few rows are left
    (XLA:CPU reduces across rows at ~3 GB/s, adds blocks elementwise at ~10; halving the rows each time, as before,
    read the words twice over and slowed down on odd row counts: 0.04 CPU-s against 0.008 for the (49408, 512)
    token embedding)."""
    if words.ndim < 2:
        return words
    rows = words.reshape(-1, words.shape[-1])
    rest = jnp.zeros(rows.shape[-1:], jnp.uint32)
    while rows.shape[0] >= 2 * _FOLD:
        whole = rows.shape[0] // _FOLD * _FOLD
        if whole < rows.shape[0]:
            rest = rest + jnp.sum(rows[whole:], axis=0, dtype=jnp.uint32)
        blocks = rows[:whole].reshape(_FOLD, whole // _FOLD, rows.shape[-1])
        folded = blocks[0]
        for block in range(1, _FOLD):
            folded = folded + blocks[block]
        rows = jax.lax.optimization_barrier(folded)
    return jnp.sum(rows, axis=0, dtype=jnp.uint32) + rest


def _block_figures(x: jax.Array, offsets: list, global_shape: tuple[int, ...], check_finite: bool = True
                   ) -> jax.Array:
    """uint32 [plain sum, weighted sum, non-finite (1/0)] of `x`, a block of a leaf of `global_shape` whose first
    element sits at `offsets` (uint32 scalars or 0, one per axis).

    The weight of word i (its row-major position in the whole leaf) is A*i + B (A even, B odd: odd weights). As
    i = row * C + column, the weighted sum is A * (C * sum(row * row sums) + sum(column * column sums)) + B * sum:
    two plain sums of the words (over the last axis, and over the others) instead of a reduction with a multiply
    fused in, which XLA:CPU runs several times slower. Linear in the words, so blocks add up exactly.
    """
    words = _words(x)
    global_shape = tuple(global_shape) + words.shape[x.ndim:]  # 64-bit types: a trailing axis of 2
    offsets = list(offsets) + [0] * (words.ndim - x.ndim)
    if words.ndim == 0:
        plain, moment = words, jnp.uint32(0)
    else:
        rows = jax.lax.optimization_barrier(jnp.sum(words, axis=-1, dtype=jnp.uint32))
        columns = jax.lax.optimization_barrier(_column_sums(words))
        row_index = _global_index(rows.shape, offsets[:-1], global_shape[:-1])
        column_index = jax.lax.iota(jnp.uint32, columns.shape[0]) + offsets[-1]
        plain = jnp.sum(rows, dtype=jnp.uint32)
        moment = (jnp.uint32(global_shape[-1] % 2**32) * jnp.sum(row_index * rows, dtype=jnp.uint32)
                  + jnp.sum(column_index * columns, dtype=jnp.uint32))
    weighted = jnp.uint32(_WEIGHT_A) * moment + jnp.uint32(_WEIGHT_B) * plain
    return jnp.stack([plain, weighted, jnp.asarray(_nonfinite(x) if check_finite else False, jnp.uint32)])


def _nonfinite(x: jax.Array) -> jax.Array | bool:
    """Whether `x` holds inf or NaN: x * 0 is 0 where x is finite and NaN where it is not, and a sum holding a NaN
    is NaN. Summed as a matrix-vector product with zeros (x as rows of its last axis): XLA:CPU runs it through its
    matrix kernels at ~10-15 GB/s per core, where `sum(x * 0)` ran at ~3."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return False
    matrix = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    zeros = jax.lax.optimization_barrier(jnp.zeros((matrix.shape[-1],), x.dtype))  # not folded away
    return ~jnp.isfinite(jnp.sum(jax.lax.dot(matrix, zeros, preferred_element_type=jnp.float32)))


def _blocks(sharding) -> tuple | None:
    """(mesh, spec) when the leaf is laid out in even blocks over named mesh axes (each device then sums its own
    block), else None (XLA partitions the sums of the whole array itself)."""
    if not isinstance(sharding, NamedSharding) or not any(sharding.spec):
        return None
    return sharding.mesh, sharding.spec


def _leaf_figures(x: jax.Array, layout: tuple | None, check_finite: bool) -> jax.Array:
    if layout is None:
        return _block_figures(x, [0] * x.ndim, x.shape, check_finite)
    mesh, spec = layout
    entries = tuple(spec) + (None,) * (x.ndim - len(spec))
    names = tuple(n for entry in entries if entry for n in ((entry,) if isinstance(entry, str) else entry))

    def local(block):
        offsets = [0 if entry is None else jax.lax.axis_index(entry).astype(jnp.uint32) * jnp.uint32(size)
                   for entry, size in zip(entries, block.shape)]
        # Sums mod 2**32 add up exactly across the blocks; replicated axes are not summed over.
        return jax.lax.psum(_block_figures(block, offsets, x.shape, check_finite), names)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=P(), check_vma=False)(x)


# XLA:CPU's newer fusion emitters summed uint32 arrays at 1-2 GB/s here, its classic emitters at 7-10 GB/s (float
# sums run at ~10 GB/s under both): on CPUs these programs are compiled with the classic ones.
_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# One program per kind of leaf (shape, dtype, layout, NaN check), not one for the whole state: a model repeats a
# few kinds (its layers; Adam's moments match the params), so the first save compiles a few small programs. The
# demo's 240 leaves are 14 kinds: 1.0 s of compiling instead of 6-8 s for one program over all of them.
_figures = jax.jit(_leaf_figures, static_argnums=(1, 2))
_figures_cpu = jax.jit(_leaf_figures, static_argnums=(1, 2), compiler_options=_CPU_OPTIONS)
_cpu_options_work = [True]


def _leaf_run(x: jax.Array, layout: tuple | None, check_finite: bool, on_cpu: bool) -> jax.Array:
    if on_cpu and _cpu_options_work[0]:
        try:
            return _figures_cpu(x, layout, check_finite)
        except Exception as e:  # an XLA that no longer has the option: its default emitters, only slower
            if "xla_cpu_use_fusion_emitters" not in str(e):
                raise
            _cpu_options_work[0] = False
    return _figures(x, layout, check_finite)


def _run(leaves: list, layouts: tuple, check_finite: bool) -> np.ndarray:
    """uint32 [len(leaves), 3]: each leaf's figures (`_block_figures`), on this host.

    On CPUs the program of a leaf sharded over several devices is waited for before the next starts: its sums meet
    across devices, and with several such programs in flight XLA:CPU's devices each waited inside a different one
    (a deadlock, seen with 8 devices in one process). Accelerators queue them in order."""
    on_cpu = all(d.platform == "cpu" for x in leaves for d in getattr(x, "devices", lambda: ())())
    figures = []
    for x, layout in zip(leaves, layouts):
        leaf = _leaf_run(x, layout, check_finite, on_cpu)
        sharding = getattr(x, "sharding", None)
        wait = on_cpu and sharding is not None and not sharding.is_fully_replicated
        figures.append(_host(leaf) if wait else leaf)
    return np.stack([_host(f) for f in figures])


def _layout(leaf) -> tuple | None:
    blocks = _blocks(getattr(leaf, "sharding", None))
    if blocks is None:
        return None
    mesh, spec = blocks
    for dim, entry in zip(np.shape(leaf), spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if dim % int(np.prod([mesh.shape[n] for n in names], dtype=np.int64)):
            return None  # uneven blocks: leave the partitioning to XLA
    return blocks


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result on this host (also on multi-process runs, where it is not fully addressable)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def summarize(tree, known_finite: bool = False) -> dict[str, dict[str, Any]]:
    """{path: {'shape', 'dtype', 'sum', 'wsum', 'finite'}} for every array leaf of `tree`.

    known_finite: every floating-point value of `tree` is already proven finite (a TrainState whose carried bound
    proves it: `TrainState.proven_finite`); the NaN/Inf check, a third read of the state, is then skipped and
    every leaf recorded finite.

    A collective on multi-process runs: every process must call it with its part of the same global arrays.
    """
    paths = leaf_paths(tree)
    leaves = list(paths.values())
    figures = (_run(leaves, tuple(_layout(x) for x in leaves), not known_finite) if paths
               else np.zeros((0, 3), np.uint32))
    return {path: {"shape": [int(d) for d in np.shape(leaf)], "dtype": str(jnp.result_type(leaf)),
                   "sum": int(row[0]), "wsum": int(row[1]), "finite": not bool(row[2])}
            for (path, leaf), row in zip(paths.items(), figures)}


def nonfinite(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The paths of the leaves holding NaN or Inf."""
    return [path for path, leaf in summary.items() if not leaf["finite"]]


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def make_record(step: int, summary: dict[str, dict[str, Any]], data_sha256: dict[str, str] | None,
                config_json: dict | None) -> dict[str, Any]:
    """The checkpoint's `integrity` item: the checksums of every leaf, of each process's data-iterator state file
    (`data_sha256`: {'process_<i>-of-<n>.json': SHA-256 of the text written}) and of the config (its canonical
    JSON)."""
    leaves = {path: {k: leaf[k] for k in ("shape", "dtype", "sum", "wsum")} for path, leaf in summary.items()}
    return {"format": FORMAT, "algorithm": ALGORITHM, "step": int(step), "leaves": leaves,
            "data_sha256": data_sha256 or None,
            "config_sha256": None if config_json is None else sha256(canonical(config_json))}


def digest(record: dict[str, Any]) -> str:
    """The SHA-256 of the record itself (kept in the checkpoint's own metadata, so a damaged record is told from
    damaged arrays)."""
    return sha256(canonical(record))


def compare(record: dict[str, Any], summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(leaves whose checksums differ from the record's, or are missing from either side; leaves holding NaN or
    Inf) of a restored state."""
    saved = record.get("leaves", {})
    mismatched = sorted(set(saved) ^ set(summary))
    for path in sorted(set(saved) & set(summary)):
        if (saved[path].get("sum"), saved[path].get("wsum")) != (summary[path]["sum"], summary[path]["wsum"]):
            mismatched.append(path)
    return mismatched, nonfinite(summary)


def shapes(record: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{path: shape} of the leaves the record describes."""
    return {path: tuple(leaf.get("shape", ())) for path, leaf in record.get("leaves", {}).items()}


def short_list(paths: list[str], limit: int = 6) -> str:
    """'a, b, c and 4 more' for messages."""
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def state_problems(record: dict[str, Any] | None, summary: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with a restored state (its `summarize`) against its record (None: only NaN/Inf is checked)."""
    mismatched, bad = ([], nonfinite(summary)) if record is None else compare(record, summary)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} array(s) do not match their checksums: {short_list(mismatched)}")
    if bad:
        problems.append(f"{len(bad)} array(s) hold NaN or Inf: {short_list(bad)}")
    return problems


# ----------------------------------------------------------------------- the small files of a checkpoint folder


def _read_json(path: str) -> Any:
    return json.loads(storage.read_bytes(path))


def read_record(directory: str, step: int) -> dict | None:
    """The checksum record of checkpoint `directory/step`; None for a checkpoint written before checkpoints
    carried checksums. Raises CheckpointDamagedError when its metadata is missing, unreadable or inconsistent."""
    root = storage.join(directory, str(step))

    def damaged(problem: str) -> CheckpointDamagedError:
        return CheckpointDamagedError(directory, step, [problem])

    missing = [name for name in REQUIRED_FILES if not storage.isfile(storage.join(root, name))]
    if missing:
        raise damaged(f"{', '.join(missing)} missing")
    try:
        marker = (_read_json(storage.join(root, "_CHECKPOINT_METADATA")).get("custom_metadata") or {}).get(MARKER_KEY)
    except (OSError, ValueError, AttributeError) as e:
        raise damaged(f"_CHECKPOINT_METADATA unreadable ({describe(e)})") from e
    record_path = storage.join(root, "integrity", "metadata")
    if marker is None:
        if storage.exists(record_path):
            raise damaged("_CHECKPOINT_METADATA lost the checksum record's digest")
        return None  # written before checkpoints carried checksums
    try:
        record = _read_json(record_path)
    except (OSError, ValueError) as e:
        raise damaged(f"checksum record integrity/metadata unreadable ({describe(e)})") from e
    if not isinstance(marker, dict) or digest(record) != marker.get("sha256"):
        raise damaged("the checksum record does not match its digest in _CHECKPOINT_METADATA")
    if record.get("format") != FORMAT:
        raise damaged(f"checksum record of unknown format {record.get('format')!r}")
    return record


def read_data_text(directory: str, step: int, record: dict | None) -> str | None:
    """The verified data-iterator state of checkpoint `directory/step` for this process (None when it has none):
    its own `process_<i>-of-<n>.json`, or, saved with another process count, the first one saved (as
    `DataIteratorHandler` does), checked against the record's SHA-256 of that file. With a record, a missing or
    unexpected file of any process is damage too."""
    folder = storage.join(directory, str(step), "data")
    expected = None if record is None else record.get("data_sha256")

    def damaged(problem: str) -> CheckpointDamagedError:
        return CheckpointDamagedError(directory, step, [problem])

    if expected is not None and not isinstance(expected, dict):
        raise damaged("the checksum record's data-iterator entry is malformed")
    if not storage.isdir(folder):
        if expected:
            raise damaged("data-iterator state (data/) missing")
        return None
    names = sorted(n for n in storage.listdir(folder) if re.fullmatch(r"process_\d+-of-\d+\.json", n))
    if expected and sorted(expected) != names:
        raise damaged(f"data-iterator state files {names} where the checkpoint wrote {sorted(expected)}")
    if not names:
        raise damaged("data-iterator state file missing")
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    name = own if own in names else names[0]
    try:
        raw = storage.read_bytes(storage.join(folder, name))
        text = raw.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(f"data-iterator state data/{name} unreadable ({describe(e)})") from e
    if expected and sha256(raw) != expected.get(name):
        raise damaged(f"data-iterator state data/{name} does not match its checksum")
    return text


def read_config(directory: str, step: int, record: dict | None) -> dict | None:
    """The config item of checkpoint `directory/step` (None when it has none), checked against the record."""
    path = storage.join(directory, str(step), "config", "metadata")
    expected = None if record is None else record.get("config_sha256")
    if not storage.exists(path):
        if expected:
            raise CheckpointDamagedError(directory, step, ["config item (config/metadata) missing"])
        return None
    try:
        config_json = _read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointDamagedError(directory, step, [f"config item unreadable ({describe(e)})"]) from e
    if expected and sha256(canonical(config_json)) != expected:
        raise CheckpointDamagedError(directory, step, ["config item config/metadata does not match its checksum"])
    return config_json
