"""The attention mask every implementation computes, and the block plan the kernels skip by.

A key is visible to a query when

    same segment  and  (not causal or kv_pos <= q_pos)  and  (no window or |q_pos - kv_pos| < window)

(the window is one-sided when causal; Mistral's convention: a query sees itself and the `w - 1`
keys before it). `attention_mask` materialises it (the reference, `ops.attention`'s "xla"); the
kernels compute it tile by tile from per-token arrays (`token_arrays`, padding keys folded into
the segment id `INVALID`) with `pair_mask`, and visit only the blocks `block_ranges` names.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

INVALID = jnp.iinfo(jnp.int32).min  # segment id of padding keys: equal to no query's
MASKED = -1e30  # score of a hidden key: finite, so a row with no visible key stays NaN-free


class Mask(NamedTuple):
    """Static description of the mask; the per-token arrays travel separately."""

    causal: bool = False
    window: int | None = None  # Mistral's convention: q_pos - kv_pos < window
    segments: bool = True  # compare segment ids (also how padding keys are hidden)


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    kv_mask=None,  # bool [batch, kv_len]: False = padding key
    causal: bool = False,
    sliding_window: int | None = None,
    q_positions=None,  # int [batch, q_len]; default arange(q_len) + kv_len - q_len
    kv_positions=None,  # int [batch, kv_len]; default arange(kv_len)
    q_segment_ids=None,  # int [batch, q_len]
    kv_segment_ids=None,  # int [batch, kv_len]
):
    """Boolean mask `[batch or 1, 1, q_len, kv_len]`, True where a query may attend to a key.

    Causal: key position <= query position. Sliding window `w` (Mistral's convention):
    query position - key position < w, so a query sees itself and the `w - 1` keys before it.
    Segments: a query attends only to keys of the same segment id.
    """
    mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    if causal or sliding_window is not None:
        if q_positions is None:
            q_positions = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)[None]
        if kv_positions is None:
            kv_positions = jnp.arange(kv_len, dtype=jnp.int32)[None]
        q_pos = q_positions[:, None, :, None]
        kv_pos = kv_positions[:, None, None, :]
        if causal:
            mask = mask & (kv_pos <= q_pos)
        if sliding_window is not None:
            mask = mask & (q_pos - kv_pos < sliding_window)
            if not causal:
                mask = mask & (kv_pos - q_pos < sliding_window)
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :].astype(bool)
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        mask = mask & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    return mask


def token_arrays(batch, q_len, kv_len, *, kv_mask=None, q_positions=None, kv_positions=None,
                 q_segment_ids=None, kv_segment_ids=None):
    """Per-token int32 positions and segment ids for the kernels, with padding keys folded in.

    Defaults follow `attention_mask`: queries are the last `q_len` of the keys.
    """
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    q_pos = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)[None] if q_positions is None else i32(q_positions)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None] if kv_positions is None else i32(kv_positions)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    q_seg = jnp.zeros((1, q_len), jnp.int32) if q_segment_ids is None else i32(q_segment_ids)
    kv_seg = jnp.zeros((1, kv_len), jnp.int32) if kv_segment_ids is None else i32(kv_segment_ids)
    if kv_mask is not None:
        kv_seg = jnp.where(jnp.asarray(kv_mask, bool), kv_seg, INVALID)
    full = lambda a, n: jnp.broadcast_to(a, (batch, n))
    return full(q_pos, q_len), full(q_seg, q_len), full(kv_pos, kv_len), full(kv_seg, kv_len)


def pair_mask(mask: Mask, same_segment, delta):
    """Visible pairs from the segment test and `delta()` (query position - key position), both
    broadcast to the tile's shape: the mask of the module docstring, shared by both kernel builds."""
    visible = same_segment
    if mask.causal or mask.window is not None:
        delta = delta()
        if mask.causal:
            visible = visible & (delta >= 0)
        if mask.window is not None:
            visible = visible & (delta < mask.window)
            if not mask.causal:
                visible = visible & (-delta < mask.window)
    return visible


# ----------------------------------------------------------------------------------------------
# Which key blocks each query block can see (and the transpose, for dK / dV).


class BlockRanges(NamedTuple):
    """int32 block intervals `[lo, hi)`: key blocks per query block (`kv_*`, `[batch, nq]`) and query
    blocks per key block (`q_*`, `[batch, nk]`). `*_lo, *_hi`: every block holding a visible pair
    lies inside. `*_full_lo, *_full_hi`: a run inside `[lo, hi)` of blocks whose pairs are all
    visible (`full_lo == full_hi == hi` when there is none)."""

    kv_lo: jax.Array
    kv_hi: jax.Array
    kv_full_lo: jax.Array
    kv_full_hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array
    q_full_lo: jax.Array
    q_full_hi: jax.Array


def _interval(p):
    """First and one-past-last True along the last axis; (0, 0) when none."""
    n = p.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(p, idx, n), axis=-1)
    last = jnp.max(jnp.where(p, idx, -1), axis=-1)
    return jnp.where(last >= 0, first, 0).astype(jnp.int32), (last + 1).astype(jnp.int32)


def _longest_run(p, empty_at):
    """`[start, end)` of the longest run of True along the last axis (the first such run);
    `(empty_at, empty_at)` when there is no True."""
    idx = jnp.arange(p.shape[-1], dtype=jnp.int32)
    last_false = lax.cummax(jnp.where(p, -1, idx), axis=p.ndim - 1)
    run = jnp.where(p, idx - last_false, 0)  # length of the run ending here
    end = jnp.argmax(run, axis=-1).astype(jnp.int32) + 1
    length = jnp.max(run, axis=-1)
    none = length == 0
    return jnp.where(none, empty_at, end - length), jnp.where(none, empty_at, end)


def block_ranges(q_pos, q_seg, kv_pos, kv_seg, mask: Mask, block_q: int, block_k: int) -> BlockRanges:
    """Which block pairs hold visible token pairs (conservatively), and which hold only visible ones.

    Inputs are padded to whole blocks: q_* `[batch, nq * block_q]`, kv_* `[batch, nk * block_k]`;
    padded queries carry segment `INVALID` too. A block pair is left out only when no pair of tokens
    in it can be visible, and called full only when every pair is, both judged from each block's
    min / max position and segment id.
    """
    big = jnp.iinfo(jnp.int32).max

    def summary(pos, seg, block):
        pos, seg = pos.reshape(pos.shape[0], -1, block), seg.reshape(seg.shape[0], -1, block)
        real = seg != INVALID
        lo = lambda x: jnp.min(jnp.where(real, x, big), axis=-1)
        hi = lambda x: jnp.max(jnp.where(real, x, -big), axis=-1)
        return lo(pos), hi(pos), lo(seg), hi(seg), jnp.any(real, axis=-1), jnp.all(real, axis=-1)

    qp_lo, qp_hi, qs_lo, qs_hi, q_any, q_all = (x[:, :, None] for x in summary(q_pos, q_seg, block_q))
    kp_lo, kp_hi, ks_lo, ks_hi, k_any, k_all = (x[:, None, :] for x in summary(kv_pos, kv_seg, block_k))
    possible = q_any & k_any & (qs_lo <= ks_hi) & (ks_lo <= qs_hi)  # [batch, nq, nk]
    # full: no padding on either side, one segment throughout, every position pair inside the mask
    full = q_all & k_all & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    if mask.causal:
        possible &= kp_lo <= qp_hi
        full &= kp_hi <= qp_lo
    if mask.window is not None:
        possible &= qp_lo - kp_hi < mask.window
        full &= qp_hi - kp_lo < mask.window
        if not mask.causal:
            possible &= kp_lo - qp_hi < mask.window
            full &= kp_hi - qp_lo < mask.window

    kv_lo, kv_hi = _interval(possible)
    q_lo, q_hi = _interval(jnp.swapaxes(possible, 1, 2))
    kv_full = _longest_run(full, kv_hi)
    q_full = _longest_run(jnp.swapaxes(full, 1, 2), q_hi)
    return BlockRanges(kv_lo, kv_hi, *kv_full, q_lo, q_hi, *q_full)
