"""Meshes and the one table that maps logical axis names onto mesh axes.

Modules name the axes of every parameter (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `norm`)
and of the activations at layer boundaries (`activation_batch`, `activation_length`,
`activation_embed`). `LOGICAL_AXIS_RULES` says where each goes on a `(data, fsdp, tensor)` mesh:
parameters are sharded over `fsdp` (ZeRO-3 style) along their model width and over `tensor`
(Megatron style) along heads / MLP / vocabulary; the batch is split over `data` and `fsdp`.

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, dcn=(4, 1, 1))   # 4 slices: data parallel across them
    shardings = param_shardings(Idefics2(config), mesh)
    params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        logits = jax.jit(model.apply)({"params": params}, input_ids)

Inside that context, `constrain(x, *logical_axes)` lays out activations (the model's layer
boundaries, generation's KV cache); outside it, it does nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# a `[batch, seq, hidden]` activation at a layer boundary: rows over the batch axes, features whole
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")

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
    ("layers", None),  # the stacked axis of scanned layers
)


def _fill(sizes: list[int], count: int, what: str) -> list[int]:
    """Resolves one -1 in `sizes` so that their product is `count`."""
    names = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one {what} mesh axis may be -1, got {names}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if count % known:
            raise ValueError(f"{count} devices cannot be split into {what} {names}")
        sizes[sizes.index(-1)] = count // known
    if int(np.prod(sizes)) != count:
        raise ValueError(f"{what.capitalize()} mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, but {count} are available")
    return sizes


def parse_mesh(text: str, devices=None) -> Mesh:
    """A mesh from a command line's `DATA,FSDP,TENSOR` (one of them may be -1: the rest of the devices),
    e.g. `1,1,8`: tensor parallel over 8 devices."""
    parts = text.split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"--mesh takes DATA,FSDP,TENSOR sizes (positive, or -1 for the rest of the devices), "
                         f"got {text!r}")
    return make_mesh(*sizes, devices=devices)


def default_granule(device) -> int:
    """The slice a device belongs to: TPU devices know their slice; elsewhere one host is one granule."""
    slice_index = getattr(device, "slice_index", None)
    return device.process_index if slice_index is None else slice_index


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, dcn: tuple[int, int, int] = (1, 1, 1),
              granule=default_granule) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (all by default); -1 takes what is left.

    Multi-slice (several TPU slices, or GPU hosts, joined by the data-centre network): `dcn` gives
    how many slices each axis spans, and `data`, `fsdp`, `tensor` are the sizes within one slice
    (over ICI / NVLink). Axis `i` is then `dcn[i] * sizes[i]` long, slices outermost, so that the
    collectives of an axis with `dcn[i] == 1` never leave a slice. Devices are grouped into slices
    by `granule(device)` (the TPU slice index, or the host).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = [int(d) for d in dcn]
    if any(d < 1 for d in dcn):
        raise ValueError(f"DCN mesh sizes must be positive, got {dict(zip(MESH_AXES, dcn))}")
    slices = int(np.prod(dcn))
    on_tpu = devices[0].platform == "tpu" and granule is default_granule
    if slices == 1:
        sizes = _fill([data, fsdp, tensor], len(devices), "the")
        if on_tpu:  # jax lays the axes along the physical torus
            return Mesh(mesh_utils.create_device_mesh(sizes, devices), MESH_AXES)
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(granule(device), []).append(device)
    if len(groups) != slices:
        raise ValueError(f"DCN mesh {dict(zip(MESH_AXES, dcn))} needs {slices} slices, but the devices form "
                         f"{len(groups)} (grouped by slice index, or by host)")
    per_slice = {len(g) for g in groups.values()}
    if len(per_slice) != 1:
        raise ValueError(f"Slices have different numbers of devices: {sorted(per_slice)}")
    ici = _fill([data, fsdp, tensor], per_slice.pop(), "the per-slice (ICI)")
    if on_tpu:
        return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES)
    # [dcn_data, dcn_fsdp, dcn_tensor, data, fsdp, tensor] -> interleave -> [dcn_data * data, ...]
    blocks = np.asarray([np.asarray(groups[key]).reshape(ici) for key in sorted(groups)]).reshape(dcn + ici)
    grid = blocks.transpose(0, 3, 1, 4, 2, 5).reshape([d * i for d, i in zip(dcn, ici)])
    return Mesh(grid, MESH_AXES)


def logical_specs(model: nn.Module, *init_args, **init_kwargs):
    """The logical `PartitionSpec` of every parameter, without allocating any."""
    if not init_args:
        init_args = (jnp.zeros((1, 1), jnp.int32),)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
    return nn.get_partition_spec(variables)["params"]


def fit_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh_shape) -> PartitionSpec:
    """Drops the mesh axes of dimensions they do not divide (such as a vocabulary of 32,003 over
    tensor=2): those dimensions stay whole on each device instead of failing to shard."""
    spec = list(spec) + [None] * (len(shape) - len(spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % int(np.prod([mesh_shape[a] for a in names])):
            spec[i] = None
    return PartitionSpec(*spec)


def fit_sharding(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    """`fit_spec` for a `NamedSharding`."""
    return NamedSharding(sharding.mesh, fit_spec(shape, sharding.spec, sharding.mesh.shape))


def constrain(x, *logical_axes: str | None):
    """`x` laid out by logical axis names (one per dimension) under the rules and the mesh in context
    (`jax.set_mesh`, `nn.logical_axis_rules`), fitted to its shape (`fit_spec`: a batch of 3 over
    data=2 stays whole); `x` itself outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return x
    spec = PartitionSpec(*nn.logical_to_mesh_axes(logical_axes))
    return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, spec, mesh.shape))


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


def put_everywhere(tree, shardings):
    """Arrays that every process holds whole (the same checkpoint, the same prompts) onto
    `shardings`, which may span processes: each process copies only its own devices' slices, with
    no traffic between processes. (`jax.device_put` of a host array onto another process's devices
    first checks that every process holds the same value: an all-gather of each array, for
    parameters the whole model on every host.) With one process it is `jax.device_put`; arrays
    already spread over several processes are resharded; `None` leaves stay `None`."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def placed_on(tree, mesh: Mesh) -> bool:
    """Whether every leaf of `tree` is a `jax.Array` with a `NamedSharding` over `mesh`."""
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(tree))


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding for a batch array `[batch, ...]`: the batch axis over (data, fsdp)."""
    spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))
