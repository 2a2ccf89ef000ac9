"""int8 weights for inference: per-output-channel symmetric quantisation of every projection.

A Dense kernel `W [in, out]` becomes `kernel` int8 `[in, out]` and `kernel_scale` float32 `[out]`
with `W ~ kernel * kernel_scale`, `kernel_scale = max |W[:, j]| / 127` (the vision tower's, the
connector's and the decoder's projections, the LM head; embeddings, norms, the patch convolution
and the Perceiver's latents stay as they are). The model runs such a tree as it is
(`layers.Dense`): the int8 kernel enters the product converted to the compute dtype (its values are
exact in bfloat16) and the product is scaled per channel, `(x @ q) * s = x @ (q * s)`, so a decode
step reads one byte per weight instead of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

QUANTIZATIONS = ("int8",)
SCALE = "kernel_scale"


def check_quantize(quantize: str | None) -> str | None:
    if quantize not in (None, "", *QUANTIZATIONS):
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZATIONS} (or None: the stored weights)")
    return quantize or None


def _quantizes(path: tuple[str, ...], leaf) -> bool:
    return path[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2


def quantize_kernel(kernel):
    """W `[in, out]` -> (int8 `[in, out]`, float32 scale `[out]`): symmetric, per output channel.
    A numpy kernel is quantised on the host, a jax one where it lives (keeping its sharding)."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    w = kernel.astype(xp.float32)
    scale = xp.max(xp.abs(w), axis=0) / 127.0
    scale = xp.where(scale == 0, 1.0, scale).astype(xp.float32)  # an all-zero column: any scale
    return xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8), scale


def quantize_params(params, quantize: str = "int8"):
    """The model parameters (unboxed, unstacked) with every Dense kernel in int8 and its scale beside it."""
    check_quantize(quantize)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if _quantizes(path, leaf):
            out[path], out[(*path[:-1], SCALE)] = quantize_kernel(leaf)
        else:
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def quantized_layout(abstract):
    """The `ShapeDtypeStruct` tree of a quantised model from the float one's (`checkpoints.abstract_params`)."""
    return jax.eval_shape(quantize_params, abstract)


def has_scales(paths) -> bool:
    """Whether parameter paths (a flat tree's keys) hold int8 weights' scales."""
    return any(path[-1] == SCALE for path in paths)


def is_quantized(params) -> bool:
    return has_scales(traverse_util.flatten_dict(params))


def dequantized(params):
    """A quantised tree back in float32 (what the int8 weights stand for)."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if path[-1] == SCALE:
            continue
        scale = flat.get((*path[:-1], SCALE))
        out[path] = leaf if scale is None else leaf.astype(jnp.float32) * scale
    return traverse_util.unflatten_dict(out)


def quantized_shardings(shardings, params):
    """`shardings` of the float model (`sharding.param_shardings`) extended to the quantised tree
    `params`: each scale is split as its kernel's output axis."""
    flat = traverse_util.flatten_dict(shardings)
    out = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] == SCALE:
            kernel = flat[(*path[:-1], "kernel")]
            spec = tuple(kernel.spec) + (None,) * (2 - len(kernel.spec))
            out[path] = NamedSharding(kernel.mesh, PartitionSpec(spec[1]))
        else:
            out[path] = flat[path]
    return traverse_util.unflatten_dict(out)


def param_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
