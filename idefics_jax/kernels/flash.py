"""Flash attention in Pallas: forward and backward, any mask `ops.attention` describes.

One kernel family serves every attention of the decoder and the vision tower: the mask is computed
inside the kernel, block by block, from per-token positions and segment ids, so nothing `[q, kv]`
sized is ever written to memory. A key is visible to a query when

    same segment  and  (not causal or kv_pos <= q_pos)  and  (no window or |q_pos - kv_pos| < window)

(the window is one-sided when causal). Padding keys carry the segment id `INVALID`, which no query
has. This is exactly `masking.attention_mask`, the reference the tests compare against.

Blocks: the grid runs over (batch, query head, query block); each program loops over the key
blocks its queries can see. Which blocks those are is worked out before the kernel from each
block's range of positions and segment ids (`block_ranges`): a conservative interval, so skipping is
a speed-up only, and exactness comes from the element mask. Causal attention visits about half the
blocks, a window of w visits about w / block_k of them, packed segments only their own. Inside that
interval, a run of blocks in which every pair is visible (one segment, no padding, wholly before
the queries and inside the window) is visited without building the element mask at all
(FlashAttention-3's split of masked and unmasked blocks): for long causal rows that is all but the
diagonal blocks.

Softmax in base 2: scores are scaled by `scale * log2(e)` in the same multiply, and `exp2` (one
`ex2.approx` on NVIDIA GPUs, where `exp` is a library call) gives the same probabilities; the
log-sum-exp kept for the backward is in base 2 too.

Backward (FlashAttention-2): `delta = rowsum(dO * O)`, then one kernel for dQ (loop over key
blocks) and one for dK, dV (grid over key blocks, loop over query blocks, per query head; the query
heads of a GQA group are summed afterwards).

Head dims that are not a power of two are split into power-of-two parts (Triton's tiles need
power-of-two sides): SigLIP's 72 as 64 + 16 (8 zero columns), 96 as 64 + 32, each part its own
tile and its own matrix product, rather than one tile padded to 128.

On Hopper the forward and the backward are `flash_mgpu`'s (Mosaic GPU: warp-specialised, wgmma,
TMA) by default for bfloat16 / float16, `Blocks(forward="mgpu", backward="mgpu")`; the two builds
give the same outputs and log-sum-exp, so either backward follows either forward.

Lowering: Triton on GPU, interpreted on CPU (`interpret=True`, how the tests run it). Layout
`[batch, seq, heads, head_dim]` throughout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from idefics_jax.kernels import flash_mgpu
from idefics_jax.kernels.masking import INVALID, MASKED, BlockRanges, Mask, block_ranges, pair_mask, token_arrays
from idefics_jax.kernels.tiles import (LOG2E, Prepared, dot, dot_t, head_parts, join, pad_axis, part_specs, pow2,
                                       take)


class Blocks(NamedTuple):
    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int | None = None  # the dK / dV kernel's query tile (None: block_q); a power of two
    num_warps: int | None = None  # Triton only
    num_stages: int = 2  # Triton's software pipelining depth: each stage holds one more K / V tile
    forward: str = "triton"  # "mgpu": the forward by `flash_mgpu` (Hopper, bfloat16 / float16), its own tiles
    mgpu: tuple[int, int, int] = (64, 128, 2)  # that forward's tiles: `flash_mgpu.MgpuBlocks` (block_q per
    # compute warpgroup, block_k, stages)
    backward: str = "triton"  # "mgpu": dQ and dK / dV by `flash_mgpu` (Hopper, bfloat16 / float16)
    mgpu_bwd: tuple[int, int, int] = (64, 64, 2)  # their tiles: `flash_mgpu.MgpuBwdBlocks` (key rows per compute
    # warpgroup of dK / dV, key block of dQ; query block of dK / dV, query rows per warpgroup of dQ; stages)


FORWARDS = ("triton", "mgpu")
BACKWARDS = FORWARDS


def _visible(mask: Mask, q_pos, q_seg, kv_pos, kv_seg):
    """[block_q, block_k] bool from per-token vectors; the element mask inside every kernel."""
    return pair_mask(mask, q_seg[:, None] == kv_seg[None, :], lambda: q_pos[:, None] - kv_pos[None, :])


def _scores(qs, ks, scale):
    """Head-dim parts of q [block_q, w] and k [block_k, w] -> float32 scores [block_q, block_k],
    scaled, in base 2 (times log2(e))."""
    products = [lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                for q, k in zip(qs, ks)]
    return sum(products[1:], products[0]) * (scale * LOG2E)


def _visit(lo, full_lo, full_hi, hi, body, carry):
    """`fori_loop` over blocks `[lo, hi)`: `body(True, j, carry)` (element mask built) outside
    `[full_lo, full_hi)`, `body(False, j, carry)` (every pair visible, no mask) inside it."""
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, True), carry)


def _pick(row, index):
    """row[index] for a traced index using vector ops only (Triton tiles have no scalar gather)."""
    return jnp.sum(jnp.where(jnp.arange(row.shape[0]) == index, row, 0))


# ----------------------------------------------------------------------------------------------
# Kernels. Refs arrive as 2-D tiles: q / o `[block_q, w]`, k / v `[kv_len, w]` (whole sequence of
# one head), positions / segments 1-D, range rows `[n_blocks_pow2]`: lo, hi, full_lo, full_hi.
# Every q / k / v / o / dO / gradient tile comes as one ref per head-dim part (`head_parts`).


def _ranges(range_refs, index):
    """This program's (lo, full_lo, full_hi, hi) from the four range rows."""
    lo, hi, full_lo, full_hi = (_pick(ref[...], index) for ref in range_refs)
    return lo, full_lo, full_hi, hi


def _forward_kernel(*refs, mask: Mask, scale: float, block_k: int, parts: int):
    (lo, hi, full_lo, full_hi, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), q_refs, k_refs, v_refs, o_refs, \
        (lse_ref,) = take(refs, 8, parts, parts, parts, parts, 1)
    qs = [r[...] for r in q_refs]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]
    block_q = qs[0].shape[0]

    def body(masked, j, carry):
        accs, m, l = carry
        cols = pl.ds(j * block_k, block_k)
        s = _scores(qs, [r[cols, :] for r in k_refs], scale)
        if masked:
            visible = _visible(mask, q_pos, q_seg, kv_pos_ref[cols], kv_seg_ref[cols])
            s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(visible, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        accs = tuple(acc * alpha[:, None] + dot(p.astype(r.dtype), r[cols, :]) for acc, r in zip(accs, v_refs))
        return accs, m_new, l * alpha + jnp.sum(p, axis=-1)

    init = (tuple(jnp.zeros((block_q, r.shape[-1]), jnp.float32) for r in v_refs),
            jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    accs, m, l = _visit(*_ranges((lo, hi, full_lo, full_hi), pl.program_id(2)), body, init)
    seen = l > 0.0  # rows with no visible key: output zero, lse irrelevant (p is masked to 0)
    for acc, o_ref in zip(accs, o_refs):
        o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), 0.0)  # base 2


def _probabilities(mask, scale, qs, ks, q_pos, q_seg, kv_pos, kv_seg, lse, masked=True):
    """The forward's softmax weights of a block, from the saved base-2 log-sum-exp `lse`."""
    p = jnp.exp2(_scores(qs, ks, scale) - lse[:, None])
    return jnp.where(_visible(mask, q_pos, q_seg, kv_pos, kv_seg), p, 0.0) if masked else p


def _dq_kernel(*refs, mask: Mask, scale: float, block_k: int, parts: int):
    (lo, hi, full_lo, full_hi, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), q_refs, k_refs, v_refs, do_refs, \
        (lse_ref, delta_ref), dq_refs = take(refs, 8, parts, parts, parts, parts, 2, parts)
    qs, dos = [r[...] for r in q_refs], [r[...] for r in do_refs]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

    def body(masked, j, dqs):
        cols = pl.ds(j * block_k, block_k)
        ks = [r[cols, :] for r in k_refs]
        p = _probabilities(mask, scale, qs, ks, q_pos, q_seg, kv_pos_ref[cols], kv_seg_ref[cols], lse, masked)
        dp = sum(dot_t(do, r[cols, :]) for do, r in zip(dos, v_refs))
        ds = p * (dp - delta[:, None])
        return tuple(dq + dot(ds.astype(k.dtype), k) for dq, k in zip(dqs, ks))

    dqs = _visit(*_ranges((lo, hi, full_lo, full_hi), pl.program_id(2)), body,
                 tuple(jnp.zeros(q.shape, jnp.float32) for q in qs))
    for dq, dq_ref in zip(dqs, dq_refs):
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, mask: Mask, scale: float, block_q: int, parts: int):
    (lo, hi, full_lo, full_hi, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref), q_refs, k_refs, v_refs, do_refs, \
        (lse_ref, delta_ref), dk_refs, dv_refs = take(refs, 8, parts, parts, parts, parts, 2, parts, parts)
    ks, vs = [r[...] for r in k_refs], [r[...] for r in v_refs]
    kv_pos, kv_seg = kv_pos_ref[...], kv_seg_ref[...]

    def body(masked, i, carry):
        dks, dvs = carry
        rows = pl.ds(i * block_q, block_q)
        qs, dos = [r[rows, :] for r in q_refs], [r[rows, :] for r in do_refs]
        p = _probabilities(mask, scale, qs, ks, q_pos_ref[rows], q_seg_ref[rows], kv_pos, kv_seg, lse_ref[rows],
                           masked)
        dvs = tuple(dv + dot(p.astype(do.dtype).T, do) for dv, do in zip(dvs, dos))
        dp = sum(dot_t(do, v) for do, v in zip(dos, vs))
        ds = (p * (dp - delta_ref[rows][:, None])).T
        dks = tuple(dk + dot(ds.astype(q.dtype), q) for dk, q in zip(dks, qs))
        return dks, dvs

    zeros = tuple(jnp.zeros(k.shape, jnp.float32) for k in ks)
    dks, dvs = _visit(*_ranges((lo, hi, full_lo, full_hi), pl.program_id(2)), body, (zeros, zeros))
    for dk, dk_ref in zip(dks, dk_refs):
        dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    for dv, dv_ref in zip(dvs, dv_refs):
        dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _compiler_params(blocks: Blocks, head_dim: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # lowering for GPUs only: not imported to interpret

    warps = blocks.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _row_spec(n: int, index_of_row):
    """A `[batch, n]` int array handed whole to each program as a 1-D row."""
    return pl.BlockSpec((None, n), index_of_row)


def _forward(x: Prepared, mask: Mask, scale: float, blocks: Blocks, interpret: bool):
    """Padded inputs -> (out [b, sq, h, d], lse float32 [b, h, sq], base 2)."""
    if _mgpu_forward(blocks, x.q.dtype):
        return flash_mgpu.forward(x, mask, scale, flash_mgpu.MgpuBlocks(*blocks.mgpu), interpret=interpret)
    b, sq, h, d = x.q.shape
    sk, kvh = x.k.shape[1], x.k.shape[2]
    groups = h // kvh
    bq, bk = blocks.block_q, blocks.block_k
    nq, parts = sq // bq, head_parts(d)
    n = len(parts)
    r = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, bq, bk)
    n_rows = pow2(nq)
    rows = [pad_axis(a, 1, n_rows) for a in (r.kv_lo, r.kv_hi, r.kv_full_lo, r.kv_full_hi)]
    q_tile = lambda bi, hi, qi: (bi, qi, hi)
    kv_whole = lambda bi, hi, qi: (bi, 0, hi // groups)
    *outs, lse = pl.pallas_call(
        functools.partial(_forward_kernel, mask=mask, scale=scale, block_k=bk, parts=n),
        grid=(b, h, nq),
        in_specs=[
            *[_row_spec(n_rows, lambda bi, hi, qi: (bi, 0))] * 4,
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            _row_spec(sk, lambda bi, hi, qi: (bi, 0)),
            _row_spec(sk, lambda bi, hi, qi: (bi, 0)),
            *part_specs((None, bq, None), q_tile, parts),
            *part_specs((None, sk, None), kv_whole, parts),
            *part_specs((None, sk, None), kv_whole, parts),
        ],
        out_specs=[*[pl.BlockSpec((None, bq, None, w), lambda bi, hi, qi: (bi, qi, hi, 0)) for w in parts],
                   pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi))],
        out_shape=[*[jax.ShapeDtypeStruct((b, sq, h, w), x.q.dtype) for w in parts],
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        compiler_params=_compiler_params(blocks, d, interpret),
        interpret=interpret,
        name="idefics_flash_forward",
    )(*rows, x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, *[x.q] * n, *[x.k] * n, *[x.v] * n)
    return join(outs), lse


def _backward(x: Prepared, out, lse, dout, mask: Mask, scale: float, blocks: Blocks, interpret: bool):
    """Padded inputs and cotangent -> (dq, dk, dv), padded like the inputs."""
    b, sq, h, d = x.q.shape
    sk, kvh = x.k.shape[1], x.k.shape[2]
    groups = h // kvh
    bq, bk = blocks.block_q, blocks.block_k
    nq, nk, parts = sq // bq, sk // bk, head_parts(d)
    n = len(parts)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    if _mgpu_backward(blocks, x.q.dtype):
        tiles = flash_mgpu.MgpuBwdBlocks(*blocks.mgpu_bwd)
        dq = flash_mgpu.backward_dq(x, dout, lse, delta, mask, scale, flash_mgpu.MgpuBlocks(
            block_q=tiles.block_q, block_k=tiles.block_k, stages=tiles.stages), interpret=interpret)
        dk, dv = flash_mgpu.backward_dkdv(x, dout, lse, delta, mask, scale, tiles, interpret=interpret)
        return dq, dk, dv
    r = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, bq, bk)
    bq_dkv = min(bq, blocks.block_q_dkv or bq)  # divides sq: both are powers of two, sq a multiple of bq
    r_dkv = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, bq_dkv, bk)
    nq_rows, nk_rows = pow2(nq), pow2(nk)
    kv_rows = [pad_axis(a, 1, nq_rows) for a in (r.kv_lo, r.kv_hi, r.kv_full_lo, r.kv_full_hi)]
    q_rows = [pad_axis(a, 1, nk_rows) for a in (r_dkv.q_lo, r_dkv.q_hi, r_dkv.q_full_lo, r_dkv.q_full_hi)]
    params = _compiler_params(blocks, d, interpret)
    row = lambda n_rows: _row_spec(n_rows, lambda bi, hi, i: (bi, 0))
    operands = lambda: [x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, *[x.q] * n, *[x.k] * n, *[x.v] * n, *[dout] * n,
                        lse, delta]

    q_tile = lambda bi, hi, qi: (bi, qi, hi)
    kv_whole = lambda bi, hi, qi: (bi, 0, hi // groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, mask=mask, scale=scale, block_k=bk, parts=n),
        grid=(b, h, nq),
        in_specs=[
            *[row(nq_rows)] * 4,
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            row(sk), row(sk),
            *part_specs((None, bq, None), q_tile, parts),
            *part_specs((None, sk, None), kv_whole, parts),
            *part_specs((None, sk, None), kv_whole, parts),
            *part_specs((None, bq, None), q_tile, parts),
            pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
        ],
        out_specs=[pl.BlockSpec((None, bq, None, w), lambda bi, hi, qi: (bi, qi, hi, 0)) for w in parts],
        out_shape=[jax.ShapeDtypeStruct((b, sq, h, w), x.q.dtype) for w in parts],
        compiler_params=params,
        interpret=interpret,
        name="idefics_flash_dq",
    )(*kv_rows, *operands())

    q_whole = lambda bi, hi, ki: (bi, 0, hi)
    kv_tile = lambda bi, hi, ki: (bi, ki, hi // groups)
    dkv = pl.pallas_call(
        functools.partial(_dkdv_kernel, mask=mask, scale=scale, block_q=bq_dkv, parts=n),
        grid=(b, h, nk),
        in_specs=[
            *[row(nk_rows)] * 4,
            row(sq), row(sq),
            pl.BlockSpec((None, bk), lambda bi, hi, ki: (bi, ki)),
            pl.BlockSpec((None, bk), lambda bi, hi, ki: (bi, ki)),
            *part_specs((None, sq, None), q_whole, parts),
            *part_specs((None, bk, None), kv_tile, parts),
            *part_specs((None, bk, None), kv_tile, parts),
            *part_specs((None, sq, None), q_whole, parts),
            pl.BlockSpec((None, None, sq), lambda bi, hi, ki: (bi, hi, 0)),
            pl.BlockSpec((None, None, sq), lambda bi, hi, ki: (bi, hi, 0)),
        ],
        # one dK / dV per query head, summed over each GQA group afterwards
        out_specs=[pl.BlockSpec((None, bk, None, w), lambda bi, hi, ki: (bi, ki, hi, 0)) for w in parts] * 2,
        out_shape=[jax.ShapeDtypeStruct((b, sk, h, w), jnp.float32) for w in parts] * 2,
        compiler_params=params,
        interpret=interpret,
        name="idefics_flash_dkdv",
    )(*q_rows, *operands())
    dk, dv = join(dkv[:n]), join(dkv[n:])
    return join(dq), sum_groups(dk, kvh, x.k.dtype), sum_groups(dv, kvh, x.k.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(x: Prepared, q, k, v, mask, scale, blocks, interpret):
    out, _ = _forward(x._replace(q=q, k=k, v=v), mask, scale, blocks, interpret)
    return out


def _flash_fwd(x, q, k, v, mask, scale, blocks, interpret):
    x = x._replace(q=q, k=k, v=v)
    out, lse = _forward(x, mask, scale, blocks, interpret)
    return out, (x, out, lse)


def _flash_bwd(mask, scale, blocks, interpret, residuals, dout):
    x, out, lse = residuals
    dq, dk, dv = _backward(x, out, lse, dout, mask, scale, blocks, interpret)
    return jax.tree.map(lambda _: None, x._replace(q=None, k=None, v=None)), dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point.


def _mgpu_forward(blocks: Blocks, dtype) -> bool:
    """Whether the Mosaic GPU forward runs: asked for, and the dtype one it takes (else Triton's)."""
    if blocks.forward not in FORWARDS:
        raise ValueError(f"unknown flash forward {blocks.forward!r}; one of {FORWARDS}")
    return blocks.forward == "mgpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _mgpu_backward(blocks: Blocks, dtype) -> bool:
    """Whether the Mosaic GPU dQ and dK / dV kernels run (else Triton's)."""
    if blocks.backward not in BACKWARDS:
        raise ValueError(f"unknown flash backward {blocks.backward!r}; one of {BACKWARDS}")
    return blocks.backward == "mgpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x: wgmma, TMA)."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def default_blocks(backend: str, head_dim: int) -> Blocks:
    """The tiles (and, on Hopper, the Mosaic GPU builds) a backend runs at `head_dim`."""
    if backend == "gpu":  # Hopper's 227 KiB of shared memory: at head dim 128 the dK / dV kernel's
        # [128, 128] query and dO tiles times 3 stages do not fit. On Hopper the forward and backward
        # are Mosaic GPU's (bfloat16 / float16), the faster (benchmarks/RESULTS.md), within the head
        # dims they were timed at (72 to 128: a wider one's accumulators take more registers, and the
        # tiny configs' narrower ones were never timed)
        mosaic = "mgpu" if 64 <= head_dim <= 128 and hopper() else "triton"
        return Blocks(block_q=128, block_k=64 if head_dim > 64 else 128,
                      block_q_dkv=64 if head_dim > 64 else 128, num_stages=2, forward=mosaic, backward=mosaic)
    return Blocks(block_q=32, block_k=32)  # interpret mode: small tiles keep the loops short


def prepare(query, key, value, *, scale: float | None, blocks: Blocks | None, interpret: bool | None,
            block_q: int | None = None, **token_kw):
    """Checks, tile sizes and padding shared by the kernels' entry points.

    Returns `(x, q, k, v, scale, blocks, interpret)`: `x` the padded per-token arrays (its q, k, v
    left empty: they are the differentiable arguments), q / k / v padded to whole blocks and, on
    every backend, the head dim to the sum of its `head_parts` (zero columns change nothing).
    `block_q` overrides the query tile (the pooling kernel's single tile).
    """
    backend = jax.default_backend()
    interpret = backend != "gpu" if interpret is None else interpret
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    scale = head_dim**-0.5 if scale is None else float(scale)
    blocks = blocks or default_blocks("cpu" if interpret else backend, head_dim)
    # Power-of-two tiles (Triton's rule), no larger than the sequence needs, at least 16 rows (MMA).
    blocks = blocks._replace(block_q=max(16, min(block_q or blocks.block_q, pow2(q_len))),
                             block_k=max(16, min(blocks.block_k, pow2(kv_len))))
    multiple_q, multiple_k = blocks.block_q, blocks.block_k
    if _mgpu_forward(blocks, query.dtype):  # its tiles too (powers of two, like the Triton ones)
        multiple_q = max(multiple_q, flash_mgpu.COMPUTE_WGS * blocks.mgpu[0])
        multiple_k = max(multiple_k, blocks.mgpu[1])
    if _mgpu_backward(blocks, query.dtype):
        multiple_q = max(multiple_q, flash_mgpu.COMPUTE_WGS * blocks.mgpu_bwd[1])  # dQ: 2 warpgroups' rows
        multiple_k = max(multiple_k, flash_mgpu.COMPUTE_WGS * blocks.mgpu_bwd[0])  # dK / dV: 2 warpgroups' keys
    sq, sk = pl.cdiv(q_len, multiple_q) * multiple_q, pl.cdiv(kv_len, multiple_k) * multiple_k
    d = sum(head_parts(head_dim))
    q_pos, q_seg, kv_pos, kv_seg = token_arrays(batch, q_len, kv_len, **token_kw)
    x = Prepared(
        q=None, k=None, v=None,
        q_pos=pad_axis(q_pos, 1, sq), q_seg=pad_axis(q_seg, 1, sq, INVALID),
        kv_pos=pad_axis(kv_pos, 1, sk), kv_seg=pad_axis(kv_seg, 1, sk, INVALID),
    )
    pad = lambda t, s: pad_axis(pad_axis(t, 1, s), 3, d)
    return x, pad(query, sq), pad(key, sk), pad(value, sk), scale, blocks, interpret


def sum_groups(per_query_head, kv_heads: int, dtype):
    """dK or dV computed per query head `[batch, kv_len, heads, d]` -> per key/value head (GQA)."""
    b, sk, h, d = per_query_head.shape
    return per_query_head.reshape(b, sk, kv_heads, h // kv_heads, d).sum(axis=3).astype(dtype)


def flash_attention(query, key, value, *, scale: float | None = None, kv_mask=None, causal: bool = False,
                    sliding_window: int | None = None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, blocks: Blocks | None = None,
                    interpret: bool | None = None):
    """`ops.attention.dot_product_attention`'s contract, computed by the Pallas kernels.

    query `[batch, q_len, heads, head_dim]`, key / value `[batch, kv_len, kv_heads, head_dim]`.
    Any lengths: sequences are padded to whole blocks (padding keys hidden, padding queries cut
    off), the head dim to a power of two. Differentiable (custom VJP).
    """
    x, q, k, v, scale, blocks, interpret = prepare(
        query, key, value, scale=scale, blocks=blocks, interpret=interpret, kv_mask=kv_mask,
        q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids)
    out = _flash(x, q, k, v, Mask(causal=causal, window=sliding_window), scale, blocks, interpret)
    return out[:, :query.shape[1], :, :query.shape[3]]


__all__ = ["BlockRanges", "Blocks", "Mask", "block_ranges", "default_blocks", "flash_attention", "head_parts",
           "prepare", "sum_groups", "token_arrays", "INVALID", "MASKED"]
