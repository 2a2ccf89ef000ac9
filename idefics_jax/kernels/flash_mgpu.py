"""Flash attention forward and backward for Hopper in Pallas Mosaic GPU: warp-specialised, wgmma, TMA.

The Triton build (`flash.py`) leaves Hopper's tensor cores mostly idle: Triton's lowering of a Pallas
kernel issues synchronous MMAs and does the softmax between them. This build is written the way
FlashAttention-3 runs on Hopper, in Pallas' Mosaic GPU dialect:

- one CTA takes `2 * block_q` query rows of one head, split between two *compute* warpgroups
  (`block_q` rows each); a third, *memory* warpgroup streams key / value blocks into a ring of
  `stages` shared-memory slots with TMA copies, each slot guarded by a "loaded" and a "consumed"
  barrier;
- scores (`Q K^T`) and the output update (`P V`) are asynchronous wgmma products with float32
  accumulators in registers;
- the two compute warpgroups take turns at the tensor cores (a shared "schedule" barrier, passed
  twice per key block): while one multiplies, the other does its softmax.

The mask is `masking`'s: per-token positions and segment ids, causal, a sliding window, padding
keys with segment `INVALID`; `masking.block_ranges` says which key blocks a query block visits and
which of them are full (no element mask built). The memory warpgroup streams the blocks the CTA's
2 * block_q rows can see; a compute warpgroup passes over the blocks only the other one needs (it
still waits on and releases their slots, since a barrier's phase is counted per waiter).

Output: `(out, lse)` exactly as `flash._forward` returns them (lse in base 2, rows that see no key
give out 0, lse 0), so either backward (Triton's in `flash.py` or this module's) takes them.

Shapes it serves: bfloat16 / float16 (wgmma takes no float32 without tf32), any head dim, as the
power-of-two parts of `tiles.head_parts` (SigLIP's 72 as 64 + 16), each part its own array,
shared-memory buffer (swizzled to its width) and wgmma. Chosen by `flash.Blocks(forward="mgpu")`,
the default on a Hopper GPU (`flash.default_blocks`; timings in `benchmarks/RESULTS.md`).

The backward (`flash.Blocks(backward="mgpu")`, also the Hopper default) is FlashAttention-2's split
into two kernels of the same plan. dK / dV (`backward_dkdv`), keys as rows: a CTA holds
`2 * block_k` keys of one key/value head, each compute warpgroup its `block_k` keys' K and V in
shared memory and dK / dV in registers across every query head of the GQA group (one output per
key/value head, no per-query-head float32 array to sum afterwards); the memory warpgroup streams
Q, dO, tokens, lse and delta per (query head, query block). dQ (`backward_dq`) is the forward's
layout: each compute warpgroup holds its query rows' Q, dO, lse and delta, dQ in registers, while
the forward's memory warpgroup (`_stream_keys`) streams K and V.

On a CPU the tests run these kernels in Pallas' GPU interpret mode (three simulated warpgroups,
barriers with per-waiter phases, TMA copies, its race detector; the two products as plain dots,
since the interpreter has no wgmma on a transposed or register operand) and lower the GPU build,
wgmma included, through Mosaic GPU's lowering for CUDA; `benchmarks/gpu_session.sh` compiles them
on a Hopper GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from idefics_jax.kernels.masking import MASKED, Mask, block_ranges, pair_mask
from idefics_jax.kernels.tiles import LOG2E, Prepared, dot, dot_t, head_parts, join, take

COMPUTE_WGS = 2  # compute warpgroups per CTA; warpgroup COMPUTE_WGS is the memory one
SWIZZLE = 128  # bytes: TMA / wgmma shared-memory swizzle


class MgpuBlocks(NamedTuple):
    block_q: int = 64  # rows per compute warpgroup (wgmma's M is 64 per warpgroup)
    block_k: int = 128
    stages: int = 2  # key / value slots in flight


def _tile_transforms(width: int, dtype):
    """Shared-memory tiling of a `[rows, width]` tile (width a power of two >= 16): 128-byte swizzle
    in 64-column tiles for wide parts, the part's own width in bytes (32 or 64) for narrow ones."""
    swizzle = min(SWIZZLE, width * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _row(x, shape):  # [block_q] (one value per row) -> [block_q, n]
    return lax.broadcast_in_dim(x, shape, (0,))


def _col(x, shape):  # [block_k] (one value per key) -> [block_q, block_k]
    return lax.broadcast_in_dim(x, shape, (1,))


def _load(ref, layout):
    """A 1-D shared-memory row read into registers in `layout` (the cast right after the read is
    what tells Mosaic GPU which layout to load in)."""
    return plgpu.layout_cast(ref[...], layout)


def _scores(q_smems, k_smems, after_issue, interpret: bool):
    """q @ k^T -> float32 `[block_q, block_k]`, summed over the head-dim parts: asynchronous wgmmas
    into one accumulator; `after_issue()` runs while they are in flight. (Pallas' GPU interpreter
    has no wgmma on a transposed operand: there, dots.)"""
    if interpret:
        s = sum(dot_t(q[...], k[...]) for q, k in zip(q_smems, k_smems))
        after_issue()
        return s

    def product(acc_ref):
        for q, k in zip(q_smems, k_smems):
            plgpu.wgmma(acc_ref, q, k.transpose((1, 0)))  # (jax 0.11 deprecates plgpu.transpose_ref)
        after_issue()
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((q_smems[0].shape[0], k_smems[0].shape[0]), jnp.float32))


def _accumulate(accs, p, v_smems, interpret: bool):
    """acc + p @ v per head-dim part: wgmma with p from registers onto the running accumulators.
    (The interpreter has neither register operands nor `run_state`: there, dots.)"""
    if interpret:
        return tuple(acc + dot(p, v[...]) for acc, v in zip(accs, v_smems))

    def products(acc_refs):
        for acc_ref, v in zip(acc_refs, v_smems):
            plgpu.wgmma(acc_ref, p, v)

    return pl.run_state(products)(tuple(plgpu.ACC.init(acc) for acc in accs))


def _forward_kernel(*refs, mask: Mask, scale: float, blocks: MgpuBlocks, groups: int, n_parts: int,
                    interpret: bool):
    """One CTA: `2 * block_q` query rows of one head. Q / K / V / output come as one array and one
    shared-memory buffer per head-dim part (`flash.head_parts`: 72 as 64 + 16; a TMA tile cannot
    cut an 80-wide row at 64), each multiplied on its own."""
    (cta_ranges, wg_ranges, q_tok_ref, kv_tok_ref), q_refs, k_refs, v_refs, out_refs, (lse_ref, scoped) = \
        take(refs, 4, n_parts, n_parts, n_parts, n_parts, 2)
    (q_smem2, q_tok_smem2, k_smem, kv_tok_smem, v_smem, lse_smem2), (k_loaded, v_loaded, q_loaded), \
        (k_free, v_free), turn = scoped
    bq, bk, stages = blocks
    batch, head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    cta_lo, cta_hi = cta_ranges[0, batch, cta], cta_ranges[1, batch, cta]
    slot_of = lambda j: lax.rem(j - cta_lo, stages)

    def take_turn():  # the two compute warpgroups alternate at the tensor cores
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smems, lse_smem = [buf.at[wg] for buf in q_smem2], lse_smem2.at[wg]
        row0 = cta * (COMPUTE_WGS * bq) + wg * bq
        qb = cta * COMPUTE_WGS + wg  # this warpgroup's query block
        lo, hi, full_lo, full_hi = (wg_ranges[i, batch, qb] for i in range(4))
        q_tok_smem = q_tok_smem2.at[wg]
        for q_smem, q_ref in zip(q_smems, q_refs):
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, bq), head], q_smem, q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(q_tok_ref.at[batch, :, pl.ds(row0, bq)], q_tok_smem, q_loaded.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        plgpu.barrier_wait(q_loaded.at[wg])
        q_pos, q_seg = _load(q_tok_smem.at[0], row_layout), _load(q_tok_smem.at[1], row_layout)

        def step(kind, j, carry):
            """One key block: kind "skip" (another warpgroup's block), "masked" or "full"."""
            acc, m, l = carry
            slot = slot_of(j)
            plgpu.barrier_wait(k_loaded.at[slot])
            if kind == "skip":
                take_turn()
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_loaded.at[slot])
                take_turn()
                plgpu.barrier_arrive(v_free.at[slot])
                return carry

            if kind == "masked":  # read before the slot is released (its tokens go with K)
                kv_pos, kv_seg = _load(kv_tok_smem.at[slot, 0], col_layout), _load(kv_tok_smem.at[slot, 1], col_layout)
            s = _scores(q_smems, [buf.at[slot] for buf in k_smem], take_turn, interpret)
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * (scale * LOG2E)
            if kind == "masked":
                shape = (bq, bk)
                visible = pair_mask(mask, _row(q_seg, shape) == _col(kv_seg, shape),
                                    lambda: _row(q_pos, shape) - _col(kv_pos, shape))
                s = jnp.where(visible, s, MASKED)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - _row(m_new, s.shape))
            if kind == "masked":
                p = jnp.where(visible, p, 0.0)
            alpha = jnp.exp2(m - m_new)
            acc = tuple(a * _row(alpha, a.shape) for a in acc)
            l = l * alpha + p.sum(axis=1)
            p = p.astype(q_refs[0].dtype)
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(turn)

            acc = _accumulate(acc, p, [buf.at[slot] for buf in v_smem], interpret)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = (tuple(plgpu.layout_cast(jnp.zeros((bq, r.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
                       for r in q_refs),
                 plgpu.layout_cast(jnp.full((bq,), MASKED, jnp.float32), row_layout),
                 plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout))
        pl.when(wg == 1)(take_turn)  # warpgroup 1 starts half a step behind
        carry = _visit(step, (cta_lo, cta_hi), (lo, hi, full_lo, full_hi), carry)
        pl.when(wg == 0)(take_turn)
        acc, m, l = carry
        seen = l > 0.0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        for a, q_smem in zip(acc, q_smems):  # the output goes out through the query's buffers
            q_smem[...] = (a * _row(inv, a.shape)).astype(q_smem.dtype)
        lse_smem[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), 0.0)
        plgpu.commit_smem()
        for q_smem, out_ref in zip(q_smems, out_refs):
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(row0, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        _stream_keys(k_refs, v_refs, kv_tok_ref, (k_smem, v_smem, kv_tok_smem), (k_loaded, v_loaded, k_free, v_free),
                     batch=batch, kv_head=lax.div(head, groups), lo=cta_lo, hi=cta_hi, block_k=bk, stages=stages)


def _visit(step, cta, wg, carry):
    """`fori_loop`s over the CTA's blocks `cta = (lo, hi)`: `step(kind, j, carry)`, kind "skip" outside
    the warpgroup's `wg = (lo, hi, full_lo, full_hi)` (blocks only the other warpgroup needs: their
    slots still waited on and released), "full" inside its full run, "masked" in the rest."""
    (cta_lo, cta_hi), (lo, hi, full_lo, full_hi) = cta, wg
    for kind, start, stop in (("skip", cta_lo, lo), ("masked", lo, full_lo), ("full", full_lo, full_hi),
                              ("masked", full_hi, hi), ("skip", hi, cta_hi)):
        carry = lax.fori_loop(start, stop, functools.partial(step, kind), carry)
    return carry


def _stream_keys(k_refs, v_refs, kv_tok_ref, smem, barriers, *, batch, kv_head, lo, hi, block_k: int, stages: int):
    """The memory warpgroup of the kernels that walk key blocks (forward, dQ): key blocks `[lo, hi)`
    of one key/value head into a ring of `stages` slots, K with the keys' tokens (`loaded` barrier K's)
    and V (V's); a slot is refilled once both compute warpgroups released it (`k_free`, `v_free`)."""
    k_smem, v_smem, kv_tok_smem = smem
    k_loaded, v_loaded, k_free, v_free = barriers
    plgpu.set_max_registers(40, action="decrease")
    slot_of = lambda j: lax.rem(j - lo, stages)

    @pl.loop(lo, hi)
    def _fetch(j):
        slot = slot_of(j)
        rows = (batch, pl.ds(j * block_k, block_k), kv_head)

        @pl.when(j - lo >= stages)  # the slot's previous block must have been used by both
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        for buf, k_ref in zip(k_smem, k_refs):
            plgpu.copy_gmem_to_smem(k_ref.at[rows], buf.at[slot], k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(kv_tok_ref.at[batch, :, pl.ds(j * block_k, block_k)], kv_tok_smem.at[slot],
                                k_loaded.at[slot])

        @pl.when(j - lo >= stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        for buf, v_ref in zip(v_smem, v_refs):
            plgpu.copy_gmem_to_smem(v_ref.at[rows], buf.at[slot], v_loaded.at[slot])

    @pl.loop(jnp.maximum(lo, hi - stages), hi)
    def _drain(j):  # the last releases: every phase of a barrier is waited for by its waiters
        plgpu.barrier_wait(k_free.at[slot_of(j)])
        plgpu.barrier_wait(v_free.at[slot_of(j)])


def _ranges(x: Prepared, mask: Mask, blocks: MgpuBlocks):
    """Block intervals for the CTAs (`[2, batch, n_cta]`: lo, hi) and for each compute warpgroup's
    query block (`[4, batch, n_q]`: lo, hi, full_lo, full_hi), the latter clipped into its CTA's
    interval (an empty one placed at the CTA's lo, so that its "skip" loops cover the CTA's)."""
    bq = blocks.block_q
    cta = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, COMPUTE_WGS * bq, blocks.block_k)
    wg = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, bq, blocks.block_k)
    return _clipped((cta.kv_lo, cta.kv_hi), (wg.kv_lo, wg.kv_hi, wg.kv_full_lo, wg.kv_full_hi))


def _clipped(cta, wg):
    """`(cta [2, batch, n_cta], wg [4, batch, n_cta * COMPUTE_WGS])` stacked from the CTAs' (lo, hi)
    and the warpgroups' (lo, hi, full_lo, full_hi), a warpgroup's empty interval placed at its CTA's lo."""
    cta_lo = jnp.repeat(cta[0], COMPUTE_WGS, axis=1)
    empty = wg[0] == wg[1]
    return jnp.stack(cta), jnp.stack([jnp.where(empty, cta_lo, a) for a in wg])


def _operands(x: Prepared, q_multiple: int, k_multiple: int):
    """Both kernels' checks of the padded inputs; returns the head-dim parts, a function splitting a
    `[..., d]` array into them, and one making a shared-memory tile per part `(n, rows)`."""
    sq, d, sk, dtype = x.q.shape[1], x.q.shape[3], x.k.shape[1], x.q.dtype
    if dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU kernel takes bfloat16 / float16, got {dtype}")
    if sq % q_multiple or sk % k_multiple:
        raise ValueError(f"sequences must be padded to whole blocks: {sq} % {q_multiple}, {sk} % {k_multiple}")
    parts = head_parts(d)
    if sum(parts) != d:
        raise ValueError(f"head dim {d} must be padded to its parts {parts} (flash.prepare does)")
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    split = lambda t: [t[..., o:o + w] for o, w in zip(offsets, parts)] if len(parts) > 1 else [t]
    tiles = lambda n, rows: tuple(plgpu.SMEM((n, rows, w), dtype, transforms=_tile_transforms(w, dtype))
                                  for w in parts)
    return parts, split, tiles


def _launch(kernel, scratch, interpret, **grid_and_out):
    """A kernel of `COMPUTE_WGS` compute warpgroups and a memory one (`kernel(*refs, scoped)`, with
    `scratch`'s shared memory and barriers scoped), as a function of its inputs."""

    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch, collective_axes="wg")

    return plgpu.kernel(entry, num_threads=COMPUTE_WGS + 1, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=(interpret_params() if interpret is True else interpret) or None, **grid_and_out)


def _token_rows(x: Prepared):
    """The kernels' first inputs after the block ranges: queries' and keys' tokens, `[batch, 2, seq]`
    (positions, segment ids)."""
    return jnp.stack([x.q_pos, x.q_seg], axis=1), jnp.stack([x.kv_pos, x.kv_seg], axis=1)


def forward(x: Prepared, mask: Mask, scale: float, blocks: MgpuBlocks = MgpuBlocks(), interpret=False):
    """Padded inputs (`flash.prepare` with `block_q = 2 * blocks.block_q`, `block_k = blocks.block_k`)
    -> (out `[b, sq, h, d]`, lse float32 `[b, h, sq]` base 2), as `flash._forward`. `interpret`:
    False (compile for the GPU), True, or `interpret_params(...)`."""
    b, sq, h, d = x.q.shape
    kvh = x.k.shape[2]
    bq, bk, stages = blocks
    parts, split, tiles = _operands(x, COMPUTE_WGS * bq, bk)
    cta_ranges, wg_ranges = _ranges(x, mask, blocks)
    dtype = x.q.dtype

    kernel = functools.partial(_forward_kernel, mask=mask, scale=scale, blocks=blocks, groups=h // kvh,
                               n_parts=len(parts), interpret=interpret)
    scratch = (
        (tiles(COMPUTE_WGS, bq), plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.int32),
         tiles(stages, bk), plgpu.SMEM((stages, 2, bk), jnp.int32),
         tiles(stages, bk), plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32)),
        # loaded: one arrival per copy (K's parts + its tokens, V's parts, Q's parts + its tokens)
        (plgpu.Barrier(num_arrivals=len(parts) + 1, num_barriers=stages),
         plgpu.Barrier(num_arrivals=len(parts), num_barriers=stages),
         plgpu.Barrier(num_arrivals=len(parts) + 1, num_barriers=COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    *outs, lse = _launch(kernel, scratch, interpret, grid=(h, sq // (COMPUTE_WGS * bq), b),
                         grid_names=("heads", "q_blocks", "batch"),
                         out_type=(*[jax.ShapeDtypeStruct((b, sq, h, w), dtype) for w in parts],
                                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)),
                         )(cta_ranges, wg_ranges, *_token_rows(x), *split(x.q), *split(x.k), *split(x.v))
    return join(outs), lse


# ----------------------------------------------------------------------------------------------
# The backward, FlashAttention-2's split: dK / dV with keys as rows, then dQ in the forward's layout.


class MgpuBwdBlocks(NamedTuple):
    block_k: int = 64  # key rows per compute warpgroup (wgmma's M)
    block_q: int = 64  # query rows per step (wgmma's N for S^T and dP^T, K for dK and dV)
    stages: int = 2  # query / dO slots in flight


def _dkdv_kernel(*refs, mask: Mask, scale: float, blocks: MgpuBwdBlocks, groups: int, n_parts: int,
                 interpret: bool):
    """One CTA: `2 * block_k` keys of one key/value head, over every query head of its GQA group.
    Each compute warpgroup keeps its `block_k` keys' K and V in shared memory and dK / dV in
    registers; the memory warpgroup streams (query head, query block) steps: Q, dO, the queries'
    tokens and their lse / delta rows. Per step, with keys as rows (so that P^T and dS^T come out of
    the products in registers, wgmma's A operand):
        S^T = K Q^T,  P^T = exp2(S^T - lse),  dV += P^T dO,
        dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q."""
    (cta_ranges, wg_ranges, q_tok_ref, kv_tok_ref, stats_ref), q_refs, k_refs, v_refs, do_refs, dk_refs, dv_refs, \
        (scoped,) = take(refs, 5, n_parts, n_parts, n_parts, n_parts, n_parts, n_parts, 1)
    (k_smem2, v_smem2, kv_tok_smem2, q_smem, do_smem, q_tok_smem, stats_smem), (kv_loaded, loaded, consumed) = scoped
    bk, bq, stages = blocks
    batch, kv_head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k_blocks")
    wg = lax.axis_index("wg")
    cta_lo, cta_hi = cta_ranges[0, batch, cta], cta_ranges[1, batch, cta]
    per_head = cta_hi - cta_lo  # steps per query head
    slot_of = lambda g, i: lax.rem(g * per_head + i - cta_lo, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        k_smems, v_smems = [buf.at[wg] for buf in k_smem2], [buf.at[wg] for buf in v_smem2]
        kv_tok_smem = kv_tok_smem2.at[wg]
        row0 = cta * (COMPUTE_WGS * bk) + wg * bk
        kb = cta * COMPUTE_WGS + wg  # this warpgroup's key block
        lo, hi, full_lo, full_hi = (wg_ranges[i, batch, kb] for i in range(4))
        rows = (batch, pl.ds(row0, bk), kv_head)
        for buf, ref in (*zip(k_smems, k_refs), *zip(v_smems, v_refs)):
            plgpu.copy_gmem_to_smem(ref.at[rows], buf, kv_loaded.at[wg])
        plgpu.copy_gmem_to_smem(kv_tok_ref.at[batch, :, pl.ds(row0, bk)], kv_tok_smem, kv_loaded.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per key (row)
        col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per query (column)
        plgpu.barrier_wait(kv_loaded.at[wg])
        kv_pos, kv_seg = _load(kv_tok_smem.at[0], row_layout), _load(kv_tok_smem.at[1], row_layout)

        def step(kind, i, carry, *, g):
            """One (query head g, query block i) step: kind "skip" (the other warpgroup's), "masked", "full"."""
            slot = slot_of(g, i)
            plgpu.barrier_wait(loaded.at[slot])
            if kind == "skip":
                plgpu.barrier_arrive(consumed.at[slot])
                return carry
            dks, dvs = carry
            qs, dos = [buf.at[slot] for buf in q_smem], [buf.at[slot] for buf in do_smem]
            lse, delta = _load(stats_smem.at[slot, 0], col_layout), _load(stats_smem.at[slot, 1], col_layout)
            shape = (bk, bq)
            s = _scores(k_smems, qs, lambda: None, interpret)  # S^T [keys, queries]
            p = jnp.exp2(s * (scale * LOG2E) - _col(lse, shape))
            if kind == "masked":
                q_pos, q_seg = _load(q_tok_smem.at[slot, 0], col_layout), _load(q_tok_smem.at[slot, 1], col_layout)
                visible = pair_mask(mask, _row(kv_seg, shape) == _col(q_seg, shape),
                                    lambda: _col(q_pos, shape) - _row(kv_pos, shape))
                p = jnp.where(visible, p, 0.0)
            dp = _scores(v_smems, dos, lambda: None, interpret)  # dP^T [keys, queries]
            ds = p * (dp - _col(delta, shape))
            dvs = _accumulate(dvs, p.astype(q_refs[0].dtype), dos, interpret)
            dks = _accumulate(dks, ds.astype(q_refs[0].dtype), qs, interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return dks, dvs

        def head(g, carry):
            return _visit(functools.partial(step, g=g), (cta_lo, cta_hi), (lo, hi, full_lo, full_hi), carry)

        zeros = tuple(plgpu.layout_cast(jnp.zeros((bk, r.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
                      for r in k_refs)
        dks, dvs = lax.fori_loop(0, groups, head, (zeros, zeros))
        for acc, buf in zip(dks, k_smems):  # out through the key / value buffers
            buf[...] = (acc * scale).astype(buf.dtype)
        for acc, buf in zip(dvs, v_smems):
            buf[...] = acc.astype(buf.dtype)
        plgpu.commit_smem()
        for buf, ref in (*zip(k_smems, dk_refs), *zip(v_smems, dv_refs)):
            plgpu.copy_smem_to_gmem(buf, ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def fetch_head(g, _):
            head = kv_head * groups + g

            @pl.loop(cta_lo, cta_hi)
            def _fetch(i):
                slot = slot_of(g, i)

                @pl.when(g * per_head + i - cta_lo >= stages)  # the slot's previous step used by both
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                cols = pl.ds(i * bq, bq)
                for buf, ref in (*zip(q_smem, q_refs), *zip(do_smem, do_refs)):
                    plgpu.copy_gmem_to_smem(ref.at[batch, cols, head], buf.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(q_tok_ref.at[batch, :, cols], q_tok_smem.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(stats_ref.at[batch, head, :, cols], stats_smem.at[slot], loaded.at[slot])

            return ()

        lax.fori_loop(0, groups, fetch_head, ())
        total = groups * per_head

        @pl.loop(jnp.maximum(0, total - stages), total)
        def _drain(t):  # the last releases: every phase of a barrier is waited for by its waiters
            plgpu.barrier_wait(consumed.at[lax.rem(t, stages)])


def _bwd_ranges(x: Prepared, mask: Mask, blocks: MgpuBwdBlocks):
    """Query-block intervals for the CTAs (`[2, batch, n_cta]`) and for each compute warpgroup's key
    block (`[4, batch, n_k]`: lo, hi, full_lo, full_hi), clipped into its CTA's as in `_ranges`."""
    bk = blocks.block_k
    cta = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, blocks.block_q, COMPUTE_WGS * bk)
    wg = block_ranges(x.q_pos, x.q_seg, x.kv_pos, x.kv_seg, mask, blocks.block_q, bk)
    return _clipped((cta.q_lo, cta.q_hi), (wg.q_lo, wg.q_hi, wg.q_full_lo, wg.q_full_hi))


def backward_dkdv(x: Prepared, dout, lse, delta, mask: Mask, scale: float,
                  blocks: MgpuBwdBlocks = MgpuBwdBlocks(), interpret=False):
    """dK, dV `[b, sk, kv_heads, d]` (the keys' dtype, each GQA group summed in float32 inside) from
    padded inputs (`flash.prepare`: queries to whole `block_q`, keys to whole `2 * block_k`), the
    output's cotangent `dout` `[b, sq, h, d]`, the forward's base-2 `lse` and `delta` = rowsum(dO * O),
    both `[b, h, sq]` float32. `interpret` as in `forward`."""
    b, sq, h, d = x.q.shape
    sk, kvh = x.k.shape[1], x.k.shape[2]
    bk, bq, stages = blocks
    parts, split, tiles = _operands(x, bq, COMPUTE_WGS * bk)
    cta_ranges, wg_ranges = _bwd_ranges(x, mask, blocks)
    dtype = x.q.dtype
    n = len(parts)

    kernel = functools.partial(_dkdv_kernel, mask=mask, scale=scale, blocks=blocks, groups=h // kvh, n_parts=n,
                               interpret=interpret)
    scratch = (
        (tiles(COMPUTE_WGS, bk), tiles(COMPUTE_WGS, bk), plgpu.SMEM((COMPUTE_WGS, 2, bk), jnp.int32),
         tiles(stages, bq), tiles(stages, bq), plgpu.SMEM((stages, 2, bq), jnp.int32),
         plgpu.SMEM((stages, 2, bq), jnp.float32)),
        # one arrival per copy: K's and V's parts + the keys' tokens; Q's and dO's parts + tokens + stats
        (plgpu.Barrier(num_arrivals=2 * n + 1, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=2 * n + 2, num_barriers=stages),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)))
    out = _launch(kernel, scratch, interpret, grid=(kvh, sk // (COMPUTE_WGS * bk), b),
                  grid_names=("heads", "k_blocks", "batch"),
                  out_type=[jax.ShapeDtypeStruct((b, sk, kvh, w), x.k.dtype) for w in parts] * 2,
                  )(cta_ranges, wg_ranges, *_token_rows(x), jnp.stack([lse, delta], axis=2), *split(x.q), *split(x.k),
                    *split(x.v), *split(dout.astype(dtype)))
    return join(out[:n]), join(out[n:])


def _dq_kernel(*refs, mask: Mask, scale: float, blocks: MgpuBlocks, groups: int, n_parts: int, interpret: bool):
    """One CTA: `2 * block_q` query rows of one head, their Q, dO, lse and delta in shared memory, dQ
    in registers; the memory warpgroup streams key blocks as the forward's does. Per key block:
        S = Q K^T,  P = exp2(S - lse),  dP = dO V^T,  dS = P (dP - delta),  dQ += dS K."""
    (cta_ranges, wg_ranges, q_tok_ref, kv_tok_ref, stats_ref), q_refs, k_refs, v_refs, do_refs, dq_refs, \
        (scoped,) = take(refs, 5, n_parts, n_parts, n_parts, n_parts, n_parts, 1)
    (q_smem2, do_smem2, q_tok_smem2, stats_smem2, k_smem, kv_tok_smem, v_smem), \
        (q_loaded, k_loaded, v_loaded), (k_free, v_free) = scoped
    bq, bk, stages = blocks
    batch, head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    cta_lo, cta_hi = cta_ranges[0, batch, cta], cta_ranges[1, batch, cta]
    slot_of = lambda j: lax.rem(j - cta_lo, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smems, do_smems = [buf.at[wg] for buf in q_smem2], [buf.at[wg] for buf in do_smem2]
        q_tok_smem, stats_smem = q_tok_smem2.at[wg], stats_smem2.at[wg]
        row0 = cta * (COMPUTE_WGS * bq) + wg * bq
        qb = cta * COMPUTE_WGS + wg
        lo, hi, full_lo, full_hi = (wg_ranges[i, batch, qb] for i in range(4))
        rows = (batch, pl.ds(row0, bq), head)
        for buf, ref in (*zip(q_smems, q_refs), *zip(do_smems, do_refs)):
            plgpu.copy_gmem_to_smem(ref.at[rows], buf, q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(q_tok_ref.at[batch, :, pl.ds(row0, bq)], q_tok_smem, q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(stats_ref.at[batch, head, :, pl.ds(row0, bq)], stats_smem, q_loaded.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        plgpu.barrier_wait(q_loaded.at[wg])
        q_pos, q_seg = _load(q_tok_smem.at[0], row_layout), _load(q_tok_smem.at[1], row_layout)
        lse, delta = _load(stats_smem.at[0], row_layout), _load(stats_smem.at[1], row_layout)

        def step(kind, j, dqs):
            """One key block: kind "skip" (the other warpgroup's), "masked" or "full"."""
            slot = slot_of(j)
            plgpu.barrier_wait(k_loaded.at[slot])
            if kind == "skip":
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return dqs
            shape = (bq, bk)
            ks = [buf.at[slot] for buf in k_smem]
            p = jnp.exp2(_scores(q_smems, ks, lambda: None, interpret) * (scale * LOG2E) - _row(lse, shape))
            if kind == "masked":
                kv_pos, kv_seg = _load(kv_tok_smem.at[slot, 0], col_layout), _load(kv_tok_smem.at[slot, 1], col_layout)
                visible = pair_mask(mask, _row(q_seg, shape) == _col(kv_seg, shape),
                                    lambda: _row(q_pos, shape) - _col(kv_pos, shape))
                p = jnp.where(visible, p, 0.0)
            plgpu.barrier_wait(v_loaded.at[slot])
            dp = _scores(do_smems, [buf.at[slot] for buf in v_smem], lambda: None, interpret)
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - _row(delta, shape))
            dqs = _accumulate(dqs, ds.astype(q_refs[0].dtype), ks, interpret)
            plgpu.barrier_arrive(k_free.at[slot])
            return dqs

        dqs = tuple(plgpu.layout_cast(jnp.zeros((bq, r.shape[-1]), jnp.float32), plgpu.Layout.WGMMA) for r in q_refs)
        dqs = _visit(step, (cta_lo, cta_hi), (lo, hi, full_lo, full_hi), dqs)
        for dq, buf in zip(dqs, q_smems):  # out through the query's buffers
            buf[...] = (dq * scale).astype(buf.dtype)
        plgpu.commit_smem()
        for buf, ref in zip(q_smems, dq_refs):
            plgpu.copy_smem_to_gmem(buf, ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        _stream_keys(k_refs, v_refs, kv_tok_ref, (k_smem, v_smem, kv_tok_smem), (k_loaded, v_loaded, k_free, v_free),
                     batch=batch, kv_head=lax.div(head, groups), lo=cta_lo, hi=cta_hi, block_k=bk, stages=stages)


def backward_dq(x: Prepared, dout, lse, delta, mask: Mask, scale: float, blocks: MgpuBlocks = MgpuBlocks(64, 64, 2),
                interpret=False):
    """dQ `[b, sq, h, d]` (the queries' dtype) from padded inputs (queries to whole `2 * block_q`,
    keys to whole `block_k`), `dout`, `lse` and `delta` as `backward_dkdv` takes them."""
    b, sq, h, d = x.q.shape
    kvh = x.k.shape[2]
    bq, bk, stages = blocks
    parts, split, tiles = _operands(x, COMPUTE_WGS * bq, bk)
    cta_ranges, wg_ranges = _ranges(x, mask, blocks)
    dtype = x.q.dtype
    n = len(parts)

    kernel = functools.partial(_dq_kernel, mask=mask, scale=scale, blocks=blocks, groups=h // kvh, n_parts=n,
                               interpret=interpret)
    scratch = (
        (tiles(COMPUTE_WGS, bq), tiles(COMPUTE_WGS, bq), plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.int32),
         plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.float32),
         tiles(stages, bk), plgpu.SMEM((stages, 2, bk), jnp.int32), tiles(stages, bk)),
        # one arrival per copy: Q's and dO's parts + tokens + stats; K's parts + the keys' tokens; V's parts
        (plgpu.Barrier(num_arrivals=2 * n + 2, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=n + 1, num_barriers=stages),
         plgpu.Barrier(num_arrivals=n, num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2)
    out = _launch(kernel, scratch, interpret, grid=(h, sq // (COMPUTE_WGS * bq), b),
                  grid_names=("heads", "q_blocks", "batch"),
                  out_type=[jax.ShapeDtypeStruct((b, sq, h, w), dtype) for w in parts],
                  )(cta_ranges, wg_ranges, *_token_rows(x), jnp.stack([lse, delta], axis=2), *split(x.q), *split(x.k),
                    *split(x.v), *split(dout.astype(dtype)))
    return join(out)


def interpret_params(detect_races: bool = False):
    """Pallas' GPU interpret mode (CPU), optionally with its happens-before race detector (which
    `races_found` then reports). Its interpreter evaluates `plgpu.layout_cast` as an ordinary
    primitive, which has no CPU lowering; a layout cast changes no value, so it lowers to its input."""
    from jax._src.interpreters import mlir  # jax internals, only for interpreting on a CPU
    from jax._src.pallas.mosaic_gpu import core as gpu_core  # (as above)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # (as above)

    mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")
    return InterpretGPUParams(detect_races=detect_races)


def races_found() -> bool:
    """Whether the last kernel interpreted with `detect_races` had a data race."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # jax internals, as above

    return bool(get_races().races_found)
