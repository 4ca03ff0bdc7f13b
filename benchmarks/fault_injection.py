"""Fault injection: damage checkpoints on purpose, every way a disk or a hand can, and check that mmjax never
loads a damaged one, never deletes a good one, and says what happened.

Trains the tiny test config (tests/tiny_config.py) for 6 steps with a checkpoint every 2 (checkpoints 2, 4, 6),
keeps the pristine workdir and what each of its checkpoints holds, then runs `--cases` cases. Each case copies
the pristine workdir and damages its newest checkpoint (some cases: the two newest, or all three) in one way:

  value        one element of a random leaf of a kind (params, opt_state mu, nu, count, step) with a random bit
               flipped, written back through tensorstore: the file stays well-formed, only the value is wrong
  chunk-bytes  1-64 random bytes flipped inside the compressed chunk of a random params/mu/nu leaf
  flip         1-64 random bytes flipped at random positions of one file: the data-iterator state, the config,
               the checksum record, `_CHECKPOINT_METADATA`, `state/_METADATA`, the OCDBT manifests and b-tree
               nodes, `_sharding`, `array_metadatas`, `commit_success.txt`
  truncate     the same files cut at a random length
  delete       the same files deleted
  json-edit    one value of a JSON file changed, the file still valid JSON (data position, config, checksums)
  bitrot       random bytes flipped in 3 random files of the checkpoint

and then, like the commands a user runs:
  1. loads the damaged step explicitly, as `mmjax eval --step N` and `mmjax.load(W, step=N)` do;
  2. resumes as `mmjax train` does (`Checkpointer.restore_latest` with the data iterator), and saves the next
     step with checkpoint.keep=3 as the loop's next checkpoint would.

Outcomes (of the resume; the explicit load must give a clear error or a bit-identical state):
  fallback-with-message   the damaged checkpoint was reported and set aside, the previous one restored, bit-identical
  clear-error             an mmjax error (one `mmjax: error:` line, exit 1) naming the step(s)
  harmless                the damage touched nothing that is read (e.g. `commit_success.txt`): the checkpoint
                          loaded, verified, bit-identical to the pristine one
  silent-wrong-load       values unlike the pristine ones, returned without an error (must be 0)
  good-checkpoint-deleted an undamaged checkpoint gone other than by keep-N (must be 0)
  unclear-error           any other exception, or a fallback without a message (must be 0)

    python benchmarks/fault_injection.py --cases 60 --seed 0

Exit code 0 iff the three "must be 0" columns are 0. tests/test_checkpoint_integrity.py runs a reduced set. The damage
is deterministic by seed for a given pristine workdir (OCDBT's data files get random names, so files are picked by
folder and size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain.python as grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

from mmjax import config as config_lib  # noqa: E402
from mmjax.errors import MmjaxError  # noqa: E402
from mmjax.runtime import sharding as shd  # noqa: E402
from mmjax.training.checkpoint import Checkpointer  # noqa: E402
from mmjax.training.state import StateFactory  # noqa: E402

TINY = os.path.join(ROOT, "tests", "tiny_config.py")
STEPS = (2, 4, 6)
KEEP = 3
LEAF_KINDS = {"params": r"^params/", "opt_state.mu": r"^opt_state/\d+/mu/", "opt_state.nu": r"^opt_state/\d+/nu/",
              "opt_state.count": r"^opt_state/\d+/count$", "step": r"^step$"}
FILES = {"data": "data/process_0-of-1.json", "config": "config/metadata", "integrity": "integrity/metadata",
         "_CHECKPOINT_METADATA": "_CHECKPOINT_METADATA", "state/_METADATA": "state/_METADATA",
         "state/manifest.ocdbt": "state/manifest.ocdbt",
         "state/ocdbt.process_0/manifest.ocdbt": "state/ocdbt.process_0/manifest.ocdbt",
         "state/d (b-tree node)": "state/d/*", "state/_sharding": "state/_sharding",
         "state/array_metadatas": "state/array_metadatas/process_0", "commit_success.txt": "commit_success.txt"}
JSON_EDITABLE = ("data", "config", "integrity", "_CHECKPOINT_METADATA")
OUTCOMES = ("fallback-with-message", "clear-error", "harmless", "silent-wrong-load", "good-checkpoint-deleted",
            "unclear-error")
MUST_BE_ZERO = ("silent-wrong-load", "good-checkpoint-deleted", "unclear-error")


@dataclass(frozen=True)
class Case:
    index: int
    target: str  # a leaf kind, a FILES key, or 'random files'
    method: str  # value, chunk-bytes, flip, truncate, delete, json-edit, bitrot
    scope: str = "newest"  # newest, two-newest, all

    def steps(self) -> tuple[int, ...]:
        return {"newest": STEPS[-1:], "two-newest": STEPS[-2:], "all": STEPS}[self.scope]

    def label(self) -> str:
        return f"{self.method} {self.target}" + ("" if self.scope == "newest" else f" ({self.scope})")


def plan(cases: int, seed: int) -> list[Case]:
    """Every (target, method) once, then random ones up to `cases`; a few hit the two newest or all checkpoints."""
    combos = [(kind, "value") for kind in LEAF_KINDS]
    combos += [(kind, "chunk-bytes") for kind in ("params", "opt_state.mu", "opt_state.nu")]
    combos += [(name, method) for name in FILES for method in ("flip", "truncate", "delete")]
    combos += [(name, "json-edit") for name in JSON_EDITABLE]
    combos.append(("random files", "bitrot"))
    scopes = [(("opt_state.nu", "value"), "two-newest"), (("state/manifest.ocdbt", "delete"), "all")]
    rng = random.Random(seed)
    out = [(c, "newest") for c in combos] + scopes
    while len(out) < cases:
        out.append((rng.choice(combos), rng.choice(["newest"] * 8 + ["two-newest", "all"])))
    if cases < len(out):
        out = rng.sample(out, cases)
    return [Case(i, target, method, scope) for i, ((target, method), scope) in enumerate(out)]


# ------------------------------------------------------------------------------------------------- damage


def _flip_bytes(path: str, rng: random.Random, lo: int = 0, hi: int | None = None, count: int | None = None) -> str:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        hi = len(data) if hi is None else hi
        if hi <= lo:
            raise ValueError(f"{path} is empty")
        positions = sorted(rng.randrange(lo, hi) for _ in range(count or rng.randint(1, 64)))
        for p in positions:
            data[p] ^= rng.randrange(1, 256)
        f.seek(0)
        f.write(data)
    return f"{len(positions)} byte(s) flipped at {positions[:4]}{' ...' if len(positions) > 4 else ''}"


def _leaf_names(ck: str, step: int, kind: str) -> list[str]:
    record = json.load(open(os.path.join(ck, str(step), "integrity", "metadata")))
    return sorted(p for p in record["leaves"] if re.search(LEAF_KINDS[kind], p))


def _damage_value(ck: str, step: int, kind: str, rng: random.Random) -> str:
    leaf = rng.choice(_leaf_names(ck, step, kind))
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{ck}/{step}/state/",
                                          "path": leaf.replace("/", ".") + "/"}}
    array = ts.open(spec).result()
    values = np.array(array.read().result())
    flat = values.reshape(-1)
    i = rng.randrange(flat.size)
    words = flat.view(np.uint32 if flat.dtype.itemsize == 4 else np.uint16)
    bit = rng.randrange(words.dtype.itemsize * 8)
    words[i] ^= words.dtype.type(1 << bit)
    array[...] = values
    return f"{leaf}[{i}] bit {bit} flipped"


def _chunk_refs(ck: str, step: int) -> dict[str, tuple[str, int, int]]:
    """{orbax key: (file, offset, length)} of the chunks stored out of line in the OCDBT b-tree."""
    base = ts.KvStore.open(f"file://{ck}/{step}/state/").result()
    manifest = ts.ocdbt.dump(base).result()
    node = ts.ocdbt.dump(base, manifest["versions"][-1]["root"]["location"]).result()
    if node.get("height", 0) != 0:
        raise NotImplementedError("b-trees of more than one level (a larger model)")
    refs = {}
    for entry in node["entries"]:
        ref = entry.get("indirect_value")
        if ref:
            m = re.fullmatch(r"value:(.*?):(d/[0-9a-f]+):(\d+):(\d+)", ref)
            refs[entry["key"].decode()] = (os.path.join(ck, str(step), "state", m.group(1), m.group(2)),
                                           int(m.group(3)), int(m.group(4)))
    return refs


def _damage_chunk(ck: str, step: int, kind: str, rng: random.Random) -> str:
    names = {leaf.replace("/", ".") for leaf in _leaf_names(ck, step, kind)}
    refs = {k: v for k, v in _chunk_refs(ck, step).items() if k.split("/")[0] in names}
    key = rng.choice(sorted(refs))
    path, offset, length = refs[key]
    return f"{key}: " + _flip_bytes(path, rng, offset, offset + length)


def _stable_order(paths: list[str]) -> list[str]:
    """Sorted by folder and size before name: OCDBT names its data files at random on each save, so that a seed
    picks the same files of a retrained pristine workdir."""
    return sorted(paths, key=lambda p: (os.path.dirname(p), os.path.getsize(p), p))


def _file(ck: str, step: int, name: str, rng: random.Random) -> str:
    pattern = FILES[name]
    if pattern.endswith("/*"):
        folder = os.path.join(ck, str(step), pattern[:-2])
        return rng.choice(_stable_order([os.path.join(folder, n) for n in os.listdir(folder)]))
    return os.path.join(ck, str(step), pattern)


def _edit_json(path: str, name: str, rng: random.Random) -> str:
    obj = json.load(open(path))
    if name == "data":
        obj["examples_seen"] += 16 * rng.choice([-1, 1])
        text, what = json.dumps(obj, indent=4), f"examples_seen -> {obj['examples_seen']}"
    elif name == "integrity":
        leaf = rng.choice(sorted(obj["leaves"]))
        obj["leaves"][leaf]["sum"] = (obj["leaves"][leaf]["sum"] + 1) % 2**32
        text, what = json.dumps(obj), f"checksum of {leaf} changed"
    elif name == "config":
        obj["seed"] = int(obj.get("seed", 0)) + 1
        text, what = json.dumps(obj), "seed changed"
    elif rng.random() < 0.5:  # _CHECKPOINT_METADATA: the record's digest, or a field nothing reads
        obj["custom_metadata"]["mmjax_integrity"]["sha256"] = "0" * 64
        text, what = json.dumps(obj), "the checksum record's digest changed"
    else:
        obj["commit_timestamp_nsecs"] += 1
        text, what = json.dumps(obj), "commit timestamp changed"
    with open(path, "w") as f:
        f.write(text)
    return what


def damage(ck: str, step: int, case: Case, rng: random.Random) -> str:
    """Damages checkpoint `step` in folder `ck` as `case` says; returns what was done."""
    if case.method == "value":
        return _damage_value(ck, step, case.target, rng)
    if case.method == "chunk-bytes":
        return _damage_chunk(ck, step, case.target, rng)
    if case.method == "bitrot":
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ck, str(step))) for f in fs]
        files = _stable_order([f for f in files if os.path.getsize(f)])
        picked = rng.sample(files, 3)
        return "; ".join(os.path.relpath(f, ck) + ": " + _flip_bytes(f, rng, count=rng.randint(1, 16))
                         for f in picked)
    path = _file(ck, step, case.target, rng)
    rel = os.path.relpath(path, ck)
    if case.method == "flip":
        return f"{rel}: " + _flip_bytes(path, rng)
    if case.method == "truncate":
        size = os.path.getsize(path)
        keep = rng.randrange(size) if size else 0
        os.truncate(path, keep)
        return f"{rel}: truncated {size} -> {keep} bytes"
    if case.method == "delete":
        os.remove(path)
        return f"{rel}: deleted"
    if case.method == "json-edit":
        return f"{rel}: " + _edit_json(path, case.target, rng)
    raise ValueError(case.method)


# ----------------------------------------------------------------------------------------------- pristine


class RecordingIterator(grain.DatasetIterator):
    """Stands in for the train loader: records the state a restore sets."""

    def __init__(self):
        super().__init__()
        self.state = None

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state

    def start_prefetch(self):
        return None


@dataclass
class Pristine:
    workdir: str
    factory: StateFactory
    states: dict  # step -> host state (numpy leaves)
    data: dict  # step -> data-iterator state
    config_json: dict


def train_pristine(workdir: str, data_dir: str) -> None:
    """The tiny config, 6 steps, checkpoints 2, 4, 6 (`keep=3`), synchronous saves."""
    from mmjax.training.loop import train  # only for making the pristine workdir

    config = config_lib.apply_overrides(config_lib.load_config_file(TINY), [
        f"config.data.data_dir={data_dir}", "config.train.steps=6", "config.checkpoint.every_steps=2",
        f"config.checkpoint.keep={KEEP}", "config.train.log_every=2"])
    train(config, workdir, verbose=False)


def load_pristine(workdir: str) -> Pristine:
    config = config_lib.load_workdir_config(workdir)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.lock()
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True, log=lambda s: None)
    states, data = {}, {}
    for step in STEPS:
        it = RecordingIterator()
        states[step] = jax.device_get(ckpt.restore(step, factory.abstract, it))
        data[step] = it.state
    config_json = ckpt.restore_config(STEPS[-1])
    ckpt.close()
    return Pristine(workdir, factory, states, data, config_json)


def _identical(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


# -------------------------------------------------------------------------------------------------- cases


def _explicit(ck: str, step: int, pristine: Pristine) -> str:
    """`mmjax eval --step N` / `mmjax.load(W, step=N)` on the damaged step."""
    ckpt = Checkpointer(ck, async_save=False, read_only=True, log=lambda s: None)
    try:
        state = ckpt.restore(step, pristine.factory.abstract)
    except MmjaxError as e:
        return "clear-error" if f"/{step} " in str(e) or f"step {step}" in str(e) else "unclear-error"
    except Exception:  # noqa: BLE001
        return "unclear-error"
    finally:
        ckpt.close()
    return "harmless" if _identical(state, pristine.states[step]) else "silent-wrong-load"


def _resume(ck: str, case: Case, pristine: Pristine, messages: list[str]) -> tuple[str, int | None]:
    """`mmjax train` resuming: restore_latest with the iterator, then the next save with keep-N."""
    it = RecordingIterator()
    damaged = case.steps()
    try:
        ckpt = Checkpointer(ck, keep=KEEP, async_save=True, log=messages.append)
        try:
            step, state = ckpt.restore_latest(pristine.factory.abstract, it)
            if step is None:
                return "unclear-error", None
            if not (_identical(state, pristine.states[step]) and it.state == pristine.data[step]):
                return "silent-wrong-load", step
            it.state = pristine.data[step]
            ckpt.save(step + 1, state, it, pristine.config_json, force=True)
        finally:
            ckpt.close()
    except MmjaxError as e:
        named = all(str(s) in str(e) for s in damaged)
        return ("clear-error" if named and "\n" not in str(e) else "unclear-error"), None
    except Exception as e:  # noqa: BLE001
        messages.append(f"{type(e).__name__}: {e}")
        return "unclear-error", None
    if step in damaged:
        return "harmless", step
    reported = all(any(f"checkpoint {s} failed verification" in m for m in messages) for s in damaged)
    return ("fallback-with-message" if reported else "unclear-error"), step


def _good_deleted(ck: str, case: Case, restored: int | None) -> list[int]:
    """Undamaged (or harmlessly damaged) checkpoints gone from `ck` other than by keep-N, and damaged ones
    deleted rather than set aside."""
    on_disk = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
    aside = ck + ".damaged"
    set_aside = {int(n.split(".")[0]) for n in os.listdir(aside)} if os.path.isdir(aside) else set()
    gone = []
    for step in STEPS:
        if step in on_disk or step in set_aside:
            continue
        pruned = len(on_disk) == KEEP and step < min(on_disk) and restored is not None
        if not pruned:
            gone.append(step)
    return gone


def run_case(case: Case, pristine: Pristine, folder: str, seed: int) -> dict:
    workdir = os.path.join(folder, f"case{case.index}")
    shutil.copytree(pristine.workdir, workdir)
    ck = os.path.join(workdir, "checkpoints")
    rng = random.Random(f"{seed}/{case.index}")
    t0 = time.time()
    done = [f"{s}: {damage(ck, s, case, rng)}" for s in case.steps()]
    explicit = _explicit(ck, case.steps()[-1], pristine)
    messages: list[str] = []
    outcome, restored = _resume(ck, case, pristine, messages)
    gone = _good_deleted(ck, case, restored)
    result = {"case": case.index, "what": case.label(), "damage": done, "explicit": explicit, "outcome": outcome,
              "restored": restored, "deleted": gone, "messages": messages[-3:], "seconds": time.time() - t0}
    if gone:
        result["outcome"] = "good-checkpoint-deleted"
    if explicit in ("silent-wrong-load", "unclear-error"):
        result["outcome"] = explicit
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(ck + ".damaged", ignore_errors=True)
    return result


def summary_table(results: list[dict]) -> str:
    counts = {k: sum(r["outcome"] == k for r in results) for k in OUTCOMES}
    explicit = {k: sum(r["explicit"] == k for r in results) for k in ("clear-error", "harmless")}
    head = "| cases | " + " | ".join(OUTCOMES) + " |"
    row = f"| {len(results)} | " + " | ".join(str(counts[k]) for k in OUTCOMES) + " |"
    line = "|---" * (len(OUTCOMES) + 1) + "|"
    return (f"{head}\n{line}\n{row}\n\nexplicit loads of the damaged step (`mmjax eval --step N`, "
            f"`mmjax.load(W, step=N)`): {explicit['clear-error']} refused with a clear error, "
            f"{explicit['harmless']} loaded bit-identical (harmless damage), "
            f"{len(results) - sum(explicit.values())} other")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--data-dir", default=None, help="where the digits dataset is built (default: under --workdir)")
    p.add_argument("--verbose", action="store_true", help="print each case's damage and messages")
    args = p.parse_args(argv)
    base = args.workdir or tempfile.mkdtemp(prefix="mmjax_faults_")
    os.makedirs(base, exist_ok=True)
    t0 = time.time()
    pristine_dir = os.path.join(base, "pristine")
    if not os.path.isdir(os.path.join(pristine_dir, "checkpoints")):
        train_pristine(pristine_dir, args.data_dir or os.path.join(base, "tfds"))
    pristine = load_pristine(pristine_dir)
    print(f"fault_injection: pristine workdir ready in {time.time() - t0:.0f} s; {args.cases} cases, seed {args.seed}")
    results = []
    for case in plan(args.cases, args.seed):
        r = run_case(case, pristine, base, args.seed)
        results.append(r)
        print(f"  case {r['case']:3d} {r['what']:<52} explicit: {r['explicit']:<12} resume: {r['outcome']}"
              + (f" (restored {r['restored']})" if r["restored"] is not None else ""), flush=True)
        if args.verbose or r["outcome"] in MUST_BE_ZERO:
            print("      damage: " + " | ".join(r["damage"]))
            for m in r["messages"]:
                print("      " + m[:400])
    print()
    print(summary_table(results))
    print(f"\nfault_injection: {time.time() - t0:.0f} s in all")
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(sum(r["outcome"] == k for r in results) == 0 for k in MUST_BE_ZERO) else 1


if __name__ == "__main__":
    sys.exit(main())
