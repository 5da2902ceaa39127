"""The device mesh and the one place logical axis names become mesh axes.

Mesh axes (`MESH_AXES`):
- `data`: replicas of the whole engine, each with its own weights, pool and batch
  (server/replicas.py); an engine itself always runs on a mesh with data=1 (`MeshShape.replica`).
- `sequence`: context parallelism. The page pool's page axis is split over it (page j of every
  sequence lives on rank j % S), prefill chunks are split over it by page (striped), and ring
  attention (model/ring_attention.py) rotates K/V blocks along it.
- `tensor`: tensor parallelism (Megatron style). Attention heads and the MLP hidden axis are split
  over it; XLA inserts the all-reduce after `o_proj` and `down`.

Modules name the logical axes of their parameters (`axes=` metadata on `nnx.Param`, see
model/layers.py) and know nothing of the mesh; `LOGICAL_RULES` maps those names to mesh axes here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model.config import ModelConfig

MESH_AXES = ('data', 'sequence', 'tensor')

# Logical axis name -> mesh axis (None: replicated). Names used by model/layers.py.
LOGICAL_RULES: dict[str, str | None] = {
    'vocab': None,
    'embed': None,  # D
    'kv_heads': 'tensor',  # K (and the query heads grouped under each kv head)
    'qkv': None,  # the R + 2 projections of one kv head's group: R queries, its key, its value
    'heads': 'tensor',  # N
    'head_dim': None,  # H
    'gate_up': None,  # the two halves of the gated MLP's input projection
    'mlp': 'tensor',  # F
}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; `parse('sequence=8,tensor=2')` reads the `--mesh` flag."""

    data: int = 1
    sequence: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f'mesh axis {axis}={size!r}: must be a positive integer.')

    @classmethod
    def parse(cls, spec: str) -> MeshShape:
        """'data=1,sequence=8,tensor=1' (any subset, any order; missing axes are 1)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(','))):
            match = re.fullmatch(r'(\w+)\s*=\s*(\d+)', item)
            if not match or match.group(1) not in MESH_AXES:
                raise ValueError(f'--mesh item {item!r}: expected AXIS=SIZE with AXIS one of '
                                 f'{", ".join(MESH_AXES)} (e.g. "sequence=8,tensor=2").')
            if match.group(1) in sizes:
                raise ValueError(f'--mesh names axis {match.group(1)!r} twice.')
            sizes[match.group(1)] = int(match.group(2))
        return cls(**sizes)

    @property
    def size(self) -> int:
        return self.data * self.sequence * self.tensor

    @property
    def replica(self) -> MeshShape:
        """One data-parallel replica's share: the sequence and tensor axes (server/replicas.py)."""
        return MeshShape(1, self.sequence, self.tensor)

    def __str__(self) -> str:
        return ','.join(f'{axis}={getattr(self, axis)}' for axis in MESH_AXES)

    def check(self, config: ModelConfig) -> None:
        """ValueError naming the model dimension a tensor-parallel size does not divide."""
        for name, dim in (('n_kv_heads', config.n_kv_heads), ('n_heads', config.n_heads),
                          ('mlp_dim', config.mlp_dim)):
            if dim % self.tensor:
                raise ValueError(f'mesh tensor={self.tensor} does not divide the model\'s '
                                 f'{name}={dim}: pick a tensor size that divides it.')


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all devices, of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != shape.size:
        raise ValueError(
            f'mesh {shape} needs {shape.size} devices, but {len(devices)} are visible '
            f'({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count='
            f'{shape.size} before JAX starts.')
    grid = np.array(devices, dtype=object).reshape(shape.data, shape.sequence, shape.tensor)
    return Mesh(grid, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(MeshShape(), jax.devices()[:1])


def logical_spec(axes: Sequence[str | None] | None, ndim: int) -> P:
    """PartitionSpec for a parameter whose dims are named `axes` (None or missing: replicated)."""
    if axes is None:
        return P()
    if len(axes) != ndim:
        raise ValueError(f'logical axes {tuple(axes)} do not match a {ndim}-D parameter.')
    return P(*(LOGICAL_RULES[name] if name is not None else None for name in axes))


def param_shardings(state: nnx.State, mesh: Mesh):
    """A NamedSharding per leaf of `state`, from each Param's `axes` metadata."""

    def one(var):
        axes = getattr(var, 'axes', None)
        return NamedSharding(mesh, logical_spec(axes, np.ndim(var.value)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """`state` placed on `mesh` by its logical axes (every process passes the same full values)."""
    shardings = param_shardings(state, mesh)

    def put(var, sharding):
        value = var.value
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            return var  # loaded straight onto this mesh (checkpoint.load's mesh): no copy
        if jax.process_count() > 1:
            host = np.asarray(value)
            value = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        else:
            value = jax.device_put(value, sharding)
        return var.replace(value)

    return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def devices_per_axis(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in zip(mesh.axis_names, mesh.devices.shape)}


def ceil_to(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)
