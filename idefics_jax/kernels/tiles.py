"""Tile helpers shared by the Pallas kernel builds (Triton, Mosaic TPU, Mosaic GPU): the padded
per-token inputs, head-dim parts, float32-accumulating products and ref bookkeeping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def take(refs, *counts):
    """Splits a flat ref list into consecutive groups of the given sizes."""
    groups, start = [], 0
    for n in counts:
        groups.append(refs[start:start + n])
        start += n
    assert start == len(refs), (start, len(refs))
    return groups


def dot(a, b):  # a [m, k] @ b [k, n], float32 accumulation
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_t(a, b):  # a [m, k] @ b [n, k]^T
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def head_parts(head_dim: int) -> tuple[int, ...]:
    """The head dim as powers of two of at least 16 (Triton's tiles: power-of-two sides, MMA's
    16-wide K), largest first, covering it with the fewest zero columns: 72 -> (64, 16), 96 ->
    (64, 32), 128 -> (128,). Each part is read and multiplied as its own tile; against padding to
    one power of two (72 -> 128) the matrix work and the loads shrink by 80 / 128 at SigLIP's 72."""
    units = -(-head_dim // 16)
    return tuple(16 << bit for bit in reversed(range(units.bit_length())) if units >> bit & 1)


def part_specs(block_shape, index_map, parts):
    """One BlockSpec per head-dim part over the same `[..., sum(parts)]` array: part `i` is the
    block at column `offset_i / width_i` (offsets are multiples of the smaller widths that follow)."""
    specs, offset = [], 0
    for width in parts:
        specs.append(pl.BlockSpec((*block_shape, width),
                                  lambda *ids, _o=offset // width: (*index_map(*ids), _o)))
        offset += width
    return specs


def join(parts_out):
    return parts_out[0] if len(parts_out) == 1 else jnp.concatenate(parts_out, axis=-1)


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class Prepared(NamedTuple):
    """Everything a kernel reads, padded to whole blocks. The int arrays are built once outside the
    custom VJP (no gradient); q, k, v are filled in inside it."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_pos: jax.Array
    q_seg: jax.Array
    kv_pos: jax.Array
    kv_seg: jax.Array
