"""Perceiver pooling in Pallas: the resampler's latents attend over [image context; latents].

The resampler's attention is small on the query side (64 latents per image) and long on the key
side (one image's patches, up to 4,900 at 980 px, then the latents). So every (image, head) is one
query tile that streams the keys once:

- forward: the flash forward kernel with a single query block (online softmax over key blocks,
  the image's context mask hiding padded patches);
- backward, fused in one kernel: with one query block, each key block is visited exactly once per
  head, so its dK and dV are complete the moment they are computed and are stored right away,
  while dQ accumulates over the loop. One pass instead of flash attention's two kernels, and no
  re-read of the keys.

GQA: dK / dV come out per query head and are summed over each key/value head's group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from idefics_jax.kernels import flash as fa
from idefics_jax.kernels.tiles import Prepared, dot, dot_t, head_parts, join, part_specs, pow2, take


def _pooling_backward_kernel(*refs, scale: float, block_k: int, parts: int):
    q_refs, k_refs, v_refs, (q_seg_ref, kv_seg_ref), do_refs, (lse_ref, delta_ref), dq_refs, dk_refs, dv_refs = \
        take(refs, parts, parts, parts, 2, parts, 2, parts, parts, parts)
    qs, dos = [r[...] for r in q_refs], [r[...] for r in do_refs]
    lse, delta = lse_ref[...], delta_ref[...]
    latents = qs[0].shape[0]
    q_pos = jnp.zeros((latents,), jnp.int32)
    q_seg = q_seg_ref[...]  # padded latent rows carry INVALID: they see nothing
    mask = fa.Mask()

    def body(j, dqs):
        cols = pl.ds(j * block_k, block_k)
        ks = [r[cols, :] for r in k_refs]
        kv_seg = kv_seg_ref[cols]
        p = fa._probabilities(mask, scale, qs, ks, q_pos, q_seg, jnp.zeros_like(kv_seg), kv_seg, lse)
        for do, dv_ref in zip(dos, dv_refs):
            dv_ref[cols, :] = dot(p.T.astype(do.dtype), do)
        dp = sum(dot_t(do, r[cols, :]) for do, r in zip(dos, v_refs))
        ds = p * (dp - delta[:, None])
        for q, dk_ref in zip(qs, dk_refs):
            dk_ref[cols, :] = dot(ds.T.astype(q.dtype), q) * scale
        return tuple(dq + dot(ds.astype(k.dtype), k) for dq, k in zip(dqs, ks))

    dqs = lax.fori_loop(0, k_refs[0].shape[0] // block_k, body, tuple(jnp.zeros(q.shape, jnp.float32) for q in qs))
    for dq, dq_ref in zip(dqs, dq_refs):
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward(x: Prepared, out, lse, dout, scale: float, blocks: fa.Blocks, interpret: bool):
    n, latents, h, d = x.q.shape
    sk, kvh = x.k.shape[1], x.k.shape[2]
    groups = h // kvh
    parts = head_parts(d)
    m = len(parts)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    query_head = lambda ni, hi: (ni, 0, hi)
    kv_head = lambda ni, hi: (ni, 0, hi // groups)
    outs = pl.pallas_call(
        functools.partial(_pooling_backward_kernel, scale=scale, block_k=blocks.block_k, parts=m),
        grid=(n, h),
        in_specs=[
            *part_specs((None, latents, None), query_head, parts),
            *part_specs((None, sk, None), kv_head, parts),
            *part_specs((None, sk, None), kv_head, parts),
            pl.BlockSpec((None, latents), lambda ni, hi: (ni, 0)),
            pl.BlockSpec((None, sk), lambda ni, hi: (ni, 0)),
            *part_specs((None, latents, None), query_head, parts),
            pl.BlockSpec((None, None, latents), lambda ni, hi: (ni, hi, 0)),
            pl.BlockSpec((None, None, latents), lambda ni, hi: (ni, hi, 0)),
        ],
        out_specs=[pl.BlockSpec((None, rows, None, w), lambda ni, hi: (ni, 0, hi, 0))
                   for rows in (latents, sk, sk) for w in parts],
        # dQ, then dK and dV per query head (summed over each GQA group afterwards)
        out_shape=[jax.ShapeDtypeStruct((n, rows, h, w), dtype)
                   for rows, dtype in ((latents, x.q.dtype), (sk, jnp.float32), (sk, jnp.float32)) for w in parts],
        compiler_params=fa._compiler_params(blocks, d, interpret),
        interpret=interpret,
        name="idefics_perceiver_pooling_backward",
    )(*[x.q] * m, *[x.k] * m, *[x.v] * m, x.q_seg, x.kv_seg, *[dout] * m, lse, delta)
    dq, dk, dv = join(outs[:m]), join(outs[m:2 * m]), join(outs[2 * m:])
    return dq, fa.sum_groups(dk, kvh, x.k.dtype), fa.sum_groups(dv, kvh, x.k.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pool(x: Prepared, q, k, v, scale, blocks, interpret):
    out, _ = fa._forward(x._replace(q=q, k=k, v=v), fa.Mask(), scale, blocks, interpret)
    return out


def _pool_fwd(x, q, k, v, scale, blocks, interpret):
    x = x._replace(q=q, k=k, v=v)
    out, lse = fa._forward(x, fa.Mask(), scale, blocks, interpret)
    return out, (x, out, lse)


def _pool_bwd(scale, blocks, interpret, residuals, dout):
    x, out, lse = residuals
    dq, dk, dv = _backward(x, out, lse, dout, scale, blocks, interpret)
    return jax.tree.map(lambda _: None, x._replace(q=None, k=None, v=None)), dq, dk, dv


_pool.defvjp(_pool_fwd, _pool_bwd)

MAX_LATENTS = 128  # one query tile; more queries than this is not pooling: use flash_attention


def perceiver_pooling(latent_queries, key, value, *, kv_mask=None, scale: float | None = None,
                      blocks: fa.Blocks | None = None, interpret: bool | None = None):
    """Latent queries `[images, latents, heads, head_dim]` over key / value `[images, kv_len, kv_heads,
    head_dim]` (the image's context, then the latents), `kv_mask` `[images, kv_len]` hiding padded
    patches. Returns `[images, latents, heads, head_dim]`; differentiable.
    """
    latents = latent_queries.shape[1]
    if latents > MAX_LATENTS:
        raise ValueError(f"perceiver_pooling takes at most {MAX_LATENTS} latent queries, got {latents}")
    x, q, k, v, scale, blocks, interpret = fa.prepare(
        latent_queries, key, value, scale=scale, blocks=blocks, interpret=interpret,
        block_q=pow2(latents), kv_mask=kv_mask)  # all latents in one query tile
    out = _pool(x, q, k, v, scale, blocks, interpret)
    return out[:, :latents, :, :latent_queries.shape[3]]
