"""The device mesh, logical-to-mesh rules, and global batches.

One mesh builder for the whole project. Model code only names logical axes ("embed", "act_batch",
...); `config.sharding.rules` maps them to the mesh axes ("data", "fsdp", "tensor") built here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.config import MESH_AXES, ConfigError, resolve_mesh_shape

BATCH_AXES = ("data", "fsdp")


def num_slices_of(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices (joined over DCN, multi-slice) `devices` span: distinct `slice_index` values."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None, num_slices: int | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") sized by `mesh_cfg` (-1 = the rest) over `devices`.

    Laid out along the physical interconnect when `devices` are all the devices (or TPU devices). Over
    several slices (`num_slices`, default: detected from the devices' `slice_index`), "data" spans the slices
    over DCN and must be a multiple of their number; every other axis stays inside a slice, on ICI.
    Axis types are Auto so `nn.with_logical_constraint` works as a sharding hint under `jax.set_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    num_slices = num_slices_of(devices) if num_slices is None else num_slices
    if num_slices > 1:
        if shape[0] % num_slices:

            raise ConfigError([f"mesh.data={shape[0]} must be a multiple of the {num_slices} slices (--num-slices): data "
                               f"parallelism spans the slices over DCN"])
        ici = (shape[0] // num_slices, shape[1], shape[2])
        device_grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices,
                                                           allow_split_physical_axes=True)
    elif devices[0].platform == "tpu" or len(devices) == len(jax.devices()):
        device_grid = mesh_utils.create_device_mesh(shape, devices=devices,
                                                    allow_split_physical_axes=True)
    else:
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """The config's rules as the hashable tuple flax expects."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in config.sharding.rules)


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (boxed, possibly abstract) pytree; unboxed leaves are replicated."""
    specs = nn.get_partition_spec(boxed_abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-leading arrays are split over data and fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays sharded over the batch axes.

    host_batch: arrays with leading dim global_batch // process_count. Every process passes its own
    slice; the result has leading dim global_batch. Values may be nested dicts of arrays (e.g.
    'audio': {'waveform', 'length'}); every leaf is sharded the same way.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                        dict(host_batch))
