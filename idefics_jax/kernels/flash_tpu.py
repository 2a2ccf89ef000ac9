"""Flash attention and Perceiver pooling in Pallas for TPU (Mosaic): the same masks as `flash.py`.

The GPU kernels loop over key blocks inside one program; a TPU kernel instead makes the key block a
grid axis (the last, sequential one) and keeps the running max, sum and output in VMEM scratch
between its steps, as jax's reference TPU flash attention does. Which blocks a query block visits,
and which of those are full (every pair visible, no element mask), comes from the same
`flash.block_ranges`, handed to the kernels as scalar-prefetch arrays: a skipped step does no work,
and its key / value block index repeats the last one fetched, so nothing is copied in for it.

TPU tiling: each program sees `[block_q, head_dim]` query and `[block_k, head_dim]` key tiles in a
`[batch, heads, seq, head_dim]` layout (the inputs are transposed to it); per-token positions and
segment ids travel lane-broadcast (`[seq, 128]` on the query side, `[8, seq]` on the key side), and
the softmax statistics as `[block_q, 128]` rows, so that every block is (8, 128)-tiled.
`block_k` is a multiple of 128, `block_q` of 8; the head dim is any size up to 128, or a multiple
of 128.

Tested in interpret mode on CPU against the reference, and lowered for TPU with `jax.export`;
not yet compiled or timed on a TPU (no TPU in this project's sessions so far).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from idefics_jax.kernels import flash as fa
from idefics_jax.kernels.masking import INVALID, MASKED, Mask, block_ranges, pair_mask, token_arrays
from idefics_jax.kernels.tiles import dot, dot_t

LANES, SUBLANES = 128, 8


def _lanes(x, width):
    """A lane-broadcast `[rows, 128]` tile as `[rows, width]` (width a multiple of 128, or at most 128)."""
    if width <= LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // LANES))


def _visible(mask: Mask, q_pos, q_seg, kv_pos, kv_seg):
    """`[block_q, block_k]` bool from `[block_q, block_k]` query-side and `[1, block_k]` key-side tiles."""
    return pair_mask(mask, q_seg == kv_seg, lambda: q_pos - kv_pos)


def _scores(q, k, scale):  # [block_q, d] x [block_k, d] -> float32 [block_q, block_k], base 2
    return fa._scores([q], [k], scale)


def _tile_mask(mask, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref):
    block_k = kv_pos_ref.shape[-1]
    return _visible(mask, _lanes(q_pos_ref[...], block_k), _lanes(q_seg_ref[...], block_k),
                    kv_pos_ref[:1, :], kv_seg_ref[:1, :])


def _step_kind(ranges, row, index):
    """(visit this block, it is full) for grid step `index` of range row `row`."""
    lo, hi, full_lo, full_hi = (r[row] for r in ranges)
    visit = (index >= lo) & (index < hi)
    return visit, visit & (index >= full_lo) & (index < full_hi)


def _branches(visit, full, compute):
    """Runs `compute(masked)` once per visited step: unmasked on full blocks, masked otherwise."""
    pl.when(full)(lambda: compute(False))
    pl.when(visit & jnp.logical_not(full))(lambda: compute(True))


# ----------------------------------------------------------------------------------------------
# Kernels. Grid (batch, head, outer block, inner block); the inner axis is the reduction.


def _forward_kernel(lo, hi, full_lo, full_hi, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, mask: Mask, scale: float, n_q: int):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _scores(q, k, scale)
        block_k = s.shape[1]
        if masked:
            visible = _tile_mask(mask, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref)
            s = jnp.where(visible, s, MASKED)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [block_q, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
        p = jnp.exp2(s - _lanes(m_next, block_k))
        if masked:
            p = jnp.where(visible, p, 0.0)
        alpha = jnp.exp2(m_prev - m_next)
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        m_scr[...] = m_next
        d = acc_scr.shape[1]
        acc_scr[...] = acc_scr[...] * _lanes(alpha, d) + dot(p.astype(v.dtype), v)

    _branches(*_step_kind((lo, hi, full_lo, full_hi), b * n_q + qi, ki), compute)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        l, m = l_scr[...], m_scr[...]
        seen = l > 0.0  # rows with no visible key: output zero
        safe = jnp.where(seen, l, 1.0)
        inverse = jnp.where(seen, 1.0 / safe, 0.0)  # [block_q, 128]
        o_ref[...] = (acc_scr[...] * _lanes(inverse, acc_scr.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log2(safe), 0.0)


def _probabilities(mask, scale, q, k, lse, tiles, masked):
    p = jnp.exp2(_scores(q, k, scale) - _lanes(lse, k.shape[0]))
    return jnp.where(_tile_mask(mask, *tiles), p, 0.0) if masked else p


def _dq_kernel(lo, hi, full_lo, full_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
               kv_pos_ref, kv_seg_ref, dq_ref, dq_scr, *, mask: Mask, scale: float, n_q: int):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(mask, scale, q, k, lse_ref[...], (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), masked)
        dp = dot_t(do, v)
        ds = p * (dp - _lanes(delta_ref[...], k.shape[0]))
        dq_scr[...] += dot(ds.astype(k.dtype), k)

    _branches(*_step_kind((lo, hi, full_lo, full_hi), b * n_q + qi, ki), compute)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(lo, hi, full_lo, full_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
                 kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, mask: Mask, scale: float, n_k: int):
    b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(mask, scale, q, k, lse_ref[...], (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), masked)
        dv_scr[...] += dot(p.T.astype(do.dtype), do)
        dp = dot_t(do, v)
        ds = p * (dp - _lanes(delta_ref[...], k.shape[0]))
        dk_scr[...] += dot(ds.T.astype(q.dtype), q)

    _branches(*_step_kind((lo, hi, full_lo, full_hi), b * n_k + ki, qi), compute)

    @pl.when(qi == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _pooling_backward_kernel(lo, hi, full_lo, full_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref,
                             q_seg_ref, kv_pos_ref, kv_seg_ref, dq_ref, dk_ref, dv_ref, dq_scr, *, scale: float,
                             n_k: int):
    """Perceiver pooling's backward in one kernel: all latents are one query block, so each key
    block is visited once per head and its dK / dV are final at once; dQ accumulates over the key
    blocks (the reduction axis)."""
    b, ki = pl.program_id(0), pl.program_id(2)

    @pl.when(ki == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)  # a block no latent sees: zero gradients
    dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(Mask(), scale, q, k, lse_ref[...], (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), masked)
        dv_ref[...] = dot(p.T.astype(do.dtype), do).astype(dv_ref.dtype)
        dp = dot_t(do, v)
        ds = p * (dp - _lanes(delta_ref[...], k.shape[0]))
        dk_ref[...] = (dot(ds.T.astype(q.dtype), q) * scale).astype(
            dk_ref.dtype)
        dq_scr[...] += dot(ds.astype(k.dtype), k)

    _branches(*_step_kind((lo, hi, full_lo, full_hi), b * n_k + ki, 0), compute)

    @pl.when(ki == pl.num_programs(2) - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing.


class _Tokens(NamedTuple):
    """Per-token int32 arrays, padded to whole blocks, lane-broadcast for the kernels (`q_*`
    `[batch, sq, 128]`, `kv_*` `[batch, 8, sk]`), and the block ranges flattened to 1-D for scalar
    prefetch: `kv_ranges` per query block, `q_ranges` per key block, each (lo, hi, full_lo, full_hi)."""

    tiles: tuple
    kv_ranges: tuple
    q_ranges: tuple


def _tokens(q_pos, q_seg, kv_pos, kv_seg, mask: Mask, block_q: int, block_k: int, sq: int, sk: int) -> _Tokens:
    pad = lambda x, n, value=0: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)
    q_pos, q_seg = pad(q_pos, sq), pad(q_seg, sq, INVALID)
    kv_pos, kv_seg = pad(kv_pos, sk), pad(kv_seg, sk, INVALID)
    r = block_ranges(q_pos, q_seg, kv_pos, kv_seg, mask, block_q, block_k)
    lanes = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))
    sublanes = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))
    flat = lambda *xs: tuple(x.reshape(-1) for x in xs)
    return _Tokens(tiles=(lanes(q_pos), lanes(q_seg), sublanes(kv_pos), sublanes(kv_seg)),
                   kv_ranges=flat(r.kv_lo, r.kv_hi, r.kv_full_lo, r.kv_full_hi),
                   q_ranges=flat(r.q_lo, r.q_hi, r.q_full_lo, r.q_full_hi))


def _delta(out, dout):
    """rowsum(dO * O) `[b, h, sq]`, lane-broadcast to `[b, h, sq, 128]` for the backward kernels."""
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    return jnp.broadcast_to(delta[..., None], (*delta.shape, LANES))


def _sum_groups(per_query_head, kv_heads: int, dtype):
    """dK or dV per query head `[b, h, sk, d]` -> per key/value head (GQA), in the kernels' layout."""
    b, h, sk, d = per_query_head.shape
    return per_query_head.reshape(b, kv_heads, h // kv_heads, sk, d).sum(axis=2).astype(dtype)


def _inner(row, inner, lo, hi):
    """The inner block a grid step reads: kept inside the step's range, so that a skipped step
    repeats a block already fetched instead of copying a new one."""
    return jnp.clip(inner, lo[row], jnp.maximum(hi[row] - 1, lo[row]))


def _token_specs(block_q, block_k, q_block, kv_block):
    """BlockSpecs of the four lane-broadcast token arrays; q_block / kv_block map grid indices and
    prefetch refs to (batch, block)."""
    q_spec = pl.BlockSpec((None, block_q, LANES), lambda *a: (*q_block(*a), 0))
    kv_spec = pl.BlockSpec((None, SUBLANES, block_k), lambda *a: (kv_block(*a)[0], 0, kv_block(*a)[1]))
    return [q_spec, q_spec, kv_spec, kv_spec]


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, name, interpret):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=4, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * (len(grid) - 1) + ("arbitrary",)),
        interpret=interpret,
        name=name,
    )


def _query_major_specs(block_q, block_k, d, groups, n_q):
    """Specs for a grid (batch, head, query block, key block): q-side blocks, k / v blocks
    (clamped to the query block's key range), token tiles."""
    kv_block = lambda bi, hi, qi, ki, lo, up, *_: _inner(bi * n_q + qi, ki, lo, up)
    q_map = lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0)
    kv_map = lambda bi, hi, qi, ki, *refs: (bi, lax.div(hi, groups), kv_block(bi, hi, qi, ki, *refs), 0)
    q_spec = lambda width: pl.BlockSpec((None, None, block_q, width), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
    tokens = _token_specs(block_q, block_k, lambda bi, hi, qi, ki, *_: (bi, qi),
                          lambda bi, hi, qi, ki, *refs: (bi, kv_block(bi, hi, qi, ki, *refs)))
    return q_spec, kv_spec, tokens


def _forward(q, k, v, tok: _Tokens, mask: Mask, scale, block_q, block_k, interpret):
    """q `[b, h, sq, d]`, k / v `[b, kvh, sk, d]` -> (out `[b, h, sq, d]`, lse `[b, h, sq, 128]`, base 2)."""
    b, h, sq, d = q.shape
    n_q, n_k = sq // block_q, k.shape[2] // block_k
    q_spec, kv_spec, tokens = _query_major_specs(block_q, block_k, d, h // k.shape[1], n_q)
    return _call(
        functools.partial(_forward_kernel, mask=mask, scale=scale, n_q=n_q), (b, h, n_q, n_k),
        [q_spec(d), kv_spec, kv_spec, *tokens], [q_spec(d), q_spec(LANES)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq, LANES), jnp.float32)],
        [pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
         pltpu.VMEM((block_q, d), jnp.float32)],
        "idefics_flash_forward_tpu", interpret,
    )(*tok.kv_ranges, q, k, v, *tok.tiles)


def _backward(q, k, v, out, lse, dout, tok: _Tokens, mask: Mask, scale, block_q, block_k, interpret):
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    groups = h // kvh
    n_q, n_k = sq // block_q, sk // block_k
    delta = _delta(out, dout)

    # dQ: grid over query blocks, key blocks the reduction
    q_spec, kv_spec, tokens = _query_major_specs(block_q, block_k, d, groups, n_q)
    dq = _call(
        functools.partial(_dq_kernel, mask=mask, scale=scale, n_q=n_q), (b, h, n_q, n_k),
        [q_spec(d), kv_spec, kv_spec, q_spec(d), q_spec(LANES), q_spec(LANES), *tokens], q_spec(d),
        jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((block_q, d), jnp.float32)],
        "idefics_flash_dq_tpu", interpret,
    )(*tok.kv_ranges, q, k, v, dout, lse, delta, *tok.tiles)

    # dK, dV per query head: grid over key blocks, query blocks (clamped to the key block's range) the reduction
    q_block = lambda bi, hi, ki, qi, lo, up, *_: _inner(bi * n_k + ki, qi, lo, up)
    q_map = lambda bi, hi, ki, qi, *refs: (bi, hi, q_block(bi, hi, ki, qi, *refs), 0)
    q_spec = lambda width: pl.BlockSpec((None, None, block_q, width), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, ki, qi, *_: (bi, lax.div(hi, groups), ki, 0))
    out_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, ki, qi, *_: (bi, hi, ki, 0))
    tokens = _token_specs(block_q, block_k, lambda bi, hi, ki, qi, *refs: (bi, q_block(bi, hi, ki, qi, *refs)),
                          lambda bi, hi, ki, qi, *_: (bi, ki))
    dk, dv = _call(
        functools.partial(_dkdv_kernel, mask=mask, scale=scale, n_k=n_k), (b, h, n_k, n_q),
        [q_spec(d), kv_spec, kv_spec, q_spec(d), q_spec(LANES), q_spec(LANES), *tokens], [out_spec] * 2,
        [jax.ShapeDtypeStruct((b, h, sk, d), jnp.float32)] * 2, [pltpu.VMEM((block_k, d), jnp.float32)] * 2,
        "idefics_flash_dkdv_tpu", interpret,
    )(*tok.q_ranges, q, k, v, dout, lse, delta, *tok.tiles)
    return dq, _sum_groups(dk, kvh, k.dtype), _sum_groups(dv, kvh, k.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(tok: _Tokens, q, k, v, mask, scale, block_q, block_k, interpret):
    return _forward(q, k, v, tok, mask, scale, block_q, block_k, interpret)[0]


def _flash_fwd(tok, q, k, v, mask, scale, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, tok, mask, scale, block_q, block_k, interpret)
    return out, (tok, q, k, v, out, lse)


def _flash_bwd(mask, scale, block_q, block_k, interpret, residuals, dout):
    tok, q, k, v, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, out, lse, dout, tok, mask, scale, block_q, block_k, interpret)
    return jax.tree.map(lambda _: None, tok), dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pooling_backward(q, k, v, out, lse, dout, tok: _Tokens, scale, block_k, interpret):
    n, h, latents, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    groups = h // kvh
    n_k = sk // block_k
    delta = _delta(out, dout)
    q_map = lambda ni, hi, ki, *_: (ni, hi, 0, 0)
    q_spec = lambda width: pl.BlockSpec((None, None, latents, width), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, d), lambda ni, hi, ki, *_: (ni, lax.div(hi, groups), ki, 0))
    out_spec = pl.BlockSpec((None, None, block_k, d), lambda ni, hi, ki, *_: (ni, hi, ki, 0))
    tokens = _token_specs(latents, block_k, lambda ni, hi, ki, *_: (ni, 0), lambda ni, hi, ki, *_: (ni, ki))
    dq, dk, dv = _call(
        functools.partial(_pooling_backward_kernel, scale=scale, n_k=n_k), (n, h, n_k),
        [q_spec(d), kv_spec, kv_spec, q_spec(d), q_spec(LANES), q_spec(LANES), *tokens],
        [q_spec(d), out_spec, out_spec],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), *[jax.ShapeDtypeStruct((n, h, sk, d), jnp.float32)] * 2],
        [pltpu.VMEM((latents, d), jnp.float32)], "idefics_perceiver_pooling_backward_tpu", interpret,
    )(*tok.q_ranges, q, k, v, dout, lse, delta, *tok.tiles)
    return dq, _sum_groups(dk, kvh, k.dtype), _sum_groups(dv, kvh, k.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pool(tok: _Tokens, q, k, v, scale, block_k, interpret):
    return _forward(q, k, v, tok, Mask(), scale, q.shape[2], block_k, interpret)[0]


def _pool_fwd(tok, q, k, v, scale, block_k, interpret):
    out, lse = _forward(q, k, v, tok, Mask(), scale, q.shape[2], block_k, interpret)
    return out, (tok, q, k, v, out, lse)


def _pool_bwd(scale, block_k, interpret, residuals, dout):
    tok, q, k, v, out, lse = residuals
    dq, dk, dv = _pooling_backward(q, k, v, out, lse, dout, tok, scale, block_k, interpret)
    return jax.tree.map(lambda _: None, tok), dq, dk, dv


_pool.defvjp(_pool_fwd, _pool_bwd)


def _check(query, key, block_q, block_k):
    heads, kv_heads, head_dim = query.shape[2], key.shape[2], query.shape[3]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if block_k % LANES or block_q % SUBLANES:
        raise ValueError(f"TPU tiles: block_k a multiple of {LANES}, block_q of {SUBLANES}; got {block_q}, {block_k}")
    if head_dim > LANES and head_dim % LANES:
        raise ValueError(f"head dim {head_dim}: at most {LANES} or a multiple of {LANES} on TPU")


def _to_kernel_layout(x, length):  # [batch, seq, heads, d] -> [batch, heads, length, d], zero-padded
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))


def perceiver_pooling_tpu(latent_queries, key, value, *, kv_mask=None, scale: float | None = None,
                          block_k: int = 128, interpret: bool | None = None):
    """`kernels.perceiver_pooling`'s contract on a TPU: latent queries `[images, latents, heads,
    head_dim]` over key / value `[images, kv_len, kv_heads, head_dim]` (the image's context, then the
    latents), `kv_mask` `[images, kv_len]`. All latents form one query block; differentiable."""
    images, latents, _, head_dim = latent_queries.shape
    kv_len = key.shape[1]
    block_q = -(-latents // SUBLANES) * SUBLANES
    _check(latent_queries, key, block_q, block_k)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    scale = head_dim**-0.5 if scale is None else float(scale)
    sk = -(-kv_len // block_k) * block_k
    tok = _tokens(*token_arrays(images, latents, kv_len, kv_mask=kv_mask), Mask(), block_q, block_k, block_q, sk)
    out = _pool(tok, _to_kernel_layout(latent_queries, block_q), _to_kernel_layout(key, sk),
                _to_kernel_layout(value, sk), scale, block_k, interpret)
    return jnp.swapaxes(out, 1, 2)[:, :latents]


def flash_attention_tpu(query, key, value, *, scale: float | None = None, kv_mask=None, causal: bool = False,
                        sliding_window: int | None = None, q_positions=None, kv_positions=None,
                        q_segment_ids=None, kv_segment_ids=None, block_q: int = 128, block_k: int = 128,
                        interpret: bool | None = None):
    """`ops.attention.dot_product_attention`'s contract on a TPU: query `[batch, q_len, heads,
    head_dim]`, key / value `[batch, kv_len, kv_heads, head_dim]`; any lengths (padded to whole
    blocks: padding keys hidden, padding queries cut off). Differentiable (custom VJP)."""
    batch, q_len, _, head_dim = query.shape
    kv_len = key.shape[1]
    _check(query, key, block_q, block_k)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    scale = head_dim**-0.5 if scale is None else float(scale)
    block_q = min(block_q, -(-q_len // SUBLANES) * SUBLANES)
    sq, sk = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k
    mask = Mask(causal=causal, window=sliding_window)
    tok = _tokens(*token_arrays(batch, q_len, kv_len, kv_mask=kv_mask, q_positions=q_positions,
                                kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids), mask, block_q, block_k, sq, sk)
    out = _flash(tok, _to_kernel_layout(query, sq), _to_kernel_layout(key, sk), _to_kernel_layout(value, sk), mask,
                 scale, block_q, block_k, interpret)
    return jnp.swapaxes(out, 1, 2)[:, :q_len]


__all__ = ["flash_attention_tpu", "perceiver_pooling_tpu"]
