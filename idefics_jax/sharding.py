"""Meshes and the one table that maps logical axis names onto mesh axes.

Modules name the axes of every parameter (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `norm`)
and of the activations at layer boundaries (`activation_batch`, `activation_length`,
`activation_embed`). `LOGICAL_AXIS_RULES` says where each goes on a `(data, fsdp, tensor)` mesh:
parameters are sharded over `fsdp` (ZeRO-3 style) along their model width and over `tensor`
(Megatron style) along heads / MLP / vocabulary; the batch is split over `data` and `fsdp`.

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    shardings = param_shardings(Idefics2(config), mesh)
    params = jax.device_put(params, shardings)
    with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        logits = jax.jit(model.apply)({"params": params}, input_ids)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (all by default); -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp x tensor = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} devices, "
            f"but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_specs(model: nn.Module, *init_args, **init_kwargs):
    """The logical `PartitionSpec` of every parameter, without allocating any."""
    if not init_args:
        init_args = (jnp.zeros((1, 1), jnp.int32),)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
    return nn.get_partition_spec(variables)["params"]


def fit_sharding(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    """Drops the mesh axes of dimensions they do not divide (such as a vocabulary of 32,003 over
    tensor=2): those dimensions stay whole on each device instead of failing to shard."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([sharding.mesh.shape[a] for a in names]))
        if shape[i] % size:
            spec[i] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def fit_shardings(abstract_tree, shardings):
    """`fit_sharding` over a tree of arrays (or ShapeDtypeStructs) and their shardings."""
    return jax.tree.map(lambda a, s: fit_sharding(tuple(a.shape), s), abstract_tree, shardings)


def param_shardings(model: nn.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES, *init_args, **init_kwargs):
    """`NamedSharding` for every parameter of `model` under `rules` on `mesh`."""
    if not init_args:
        init_args = (jnp.zeros((1, 1), jnp.int32),)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract)["params"], mesh, rules)
    return fit_shardings(nn.meta.unbox(abstract["params"]), shardings)


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding for a batch array `[batch, ...]`: the batch axis over (data, fsdp)."""
    spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))
