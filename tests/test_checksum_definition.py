"""The checkpoint checksums are the figures their definition says, however they are computed: a checkpoint
written by any version of `mmjax.training.integrity` must verify with any other (`integrity.ALGORITHM`)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.training import integrity

A, B = 0x3C6EF362, 0x7F4A7C15


def reference(x: np.ndarray) -> tuple[int, int, bool]:
    """The definition, in numpy: the leaf's 32-bit words (8- and 16-bit types widened), their sum and their sum
    weighted by A*i + B (i the word's row-major position), mod 2**32; and whether every float is finite."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint32)
    else:
        words = x.view(np.dtype(f"uint{x.dtype.itemsize * 8}")).astype(np.uint32)
    words = words.reshape(-1).astype(np.uint64)
    i = np.arange(words.size, dtype=np.uint64)
    plain = int(words.sum(dtype=np.uint64) % 2**32)
    weighted = int((((A * i + B) % 2**32) * words).sum(dtype=np.uint64) % 2**32)  # uint64 wraps mod 2**64
    finite = bool(np.isfinite(x.astype(np.float32)).all()) if np.issubdtype(x.dtype, np.floating) or \
        x.dtype == ml_dtypes.bfloat16 else True
    return plain, weighted, finite


def random_leaf(rng, shape, dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    bits = np.dtype(dtype).itemsize * 8
    words = rng.integers(0, 2**bits, shape, dtype=np.uint64).astype(np.dtype(f"uint{bits}"))
    x = words.view(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype == ml_dtypes.bfloat16:  # finite random values
        x = np.where(np.isfinite(x.astype(np.float32)), x, np.asarray(1.5, dtype))
    return x


def figures(x) -> tuple[int, int, bool]:
    leaf = integrity.summarize({"x": x})["x"]
    return leaf["sum"], leaf["wsum"], leaf["finite"]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint8, np.bool_])
@pytest.mark.parametrize("shape", [(), (7,), (16, 8), (3, 5, 7), (64, 33)])
def test_figures_match_the_definition(shape, dtype):
    x = random_leaf(np.random.default_rng(hash((shape, str(dtype))) % 2**32), shape, dtype)
    assert figures(jnp.asarray(x)) == reference(x)


def test_figures_wrap_exactly_mod_2_32():
    x = np.full((1000, 999), -1, np.int32)  # every word 0xFFFFFFFF: every partial sum overflows
    assert figures(jnp.asarray(x)) == reference(x)
    y = np.full((3, 4096, 257), np.float32(-3.4e38))
    assert figures(jnp.asarray(y)) == reference(y)


@pytest.mark.parametrize("spec", [P("a", "b"), P("a", None), P(None, "b"), P(("a", "b"),), P(None, "a", "b")])
def test_sharded_figures_match_the_definition(spec):
    shape = (16, 8) if len(spec) < 3 else (2, 8, 6)
    x = random_leaf(np.random.default_rng(1), shape, np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    assert figures(jax.device_put(x, NamedSharding(mesh, spec))) == reference(x)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, -1, 77])
def test_every_nonfinite_value_is_seen(bad, where):
    x = np.random.default_rng(2).standard_normal((40, 9)).astype(np.float32)
    x.reshape(-1)[where] = bad
    assert not figures(jnp.asarray(x))[2]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    assert not figures(jax.device_put(x, NamedSharding(mesh, P("a", None))))[2]
    big = np.full((5, 6), 3.4e38, np.float32)  # large finite values are finite
    assert figures(jnp.asarray(big))[2]


def test_a_state_of_many_leaves_compiles_one_program_per_kind_of_leaf():
    """A model repeats a few kinds of leaf (its layers; Adam's moments match the params): the first checksums of a
    state compile one small program per kind, not one per leaf nor one over the whole state (which took 6-8 s to
    compile for the demo's 240 leaves), and every leaf, sharded over 8 devices or not, keeps its figures."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(3)
    kinds = [((24, 8), np.float32, P("a", "b")), ((24, 8), np.float32, P()), ((5,), ml_dtypes.bfloat16, P())]
    tree = {f"layer{i}/{k}": random_leaf(rng, *kinds[k][:2]) for i in range(12) for k in range(len(kinds))}
    placed = {path: jax.device_put(x, NamedSharding(mesh, kinds[int(path[-1])][2])) for path, x in tree.items()}
    program = integrity._figures_cpu if jax.devices()[0].platform == "cpu" else integrity._figures
    program.clear_cache()
    summary = integrity.summarize(placed)
    assert program._cache_size() == len(kinds)
    assert {p: (s["sum"], s["wsum"], s["finite"]) for p, s in summary.items()} == \
        {p: reference(x) for p, x in tree.items()}
