"""jax's TPU splash attention (Pallas / Mosaic) behind `ops.attention`'s contract.

Splash takes one example at a time, heads first (`[heads, seq, head_dim]`), a static mask object
(causal, local window, full) and optional segment ids; it does not scale the scores. Padding keys
are folded into the segment ids (a key segment no query has), and rows that see no key at all are
zeroed afterwards, as the reference does. Explicit positions (a KV cache) are not expressible: the
selector in `ops.attention` sends those calls to "xla".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

PADDING_SEGMENT = -(2**30)  # a key segment no query carries


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, seq: int, causal: bool, window: int | None, block: int, interpret: bool):
    shape = (seq, seq)
    if window is not None:
        one = splash_mask.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        one = splash_mask.CausalMask(shape)
    else:
        one = splash_mask.FullMask(shape)
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # the mask tables are constants: never tracers of the caller's jit
        return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), head_shards=1,
                                             q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(query, key, value, *, scale: float, kv_mask=None, causal: bool = False,
                     sliding_window: int | None = None, q_positions=None, kv_positions=None,
                     q_segment_ids=None, kv_segment_ids=None, interpret: bool = False):
    """query `[batch, seq, heads, head_dim]`, key / value `[batch, seq, kv_heads, head_dim]`, seq a
    multiple of 128; masks by token index (no explicit positions)."""
    from idefics_jax.ops.attention import attention_mask

    if q_positions is not None or kv_positions is not None:
        raise ValueError("splash attention masks by token index; explicit positions need 'xla' or 'pallas'")
    batch, seq, heads, _ = query.shape
    if key.shape[1] != seq:
        raise ValueError(f"splash attention needs equal query and key lengths, got {seq} and {key.shape[1]}")
    kernel = _kernel(heads, seq, causal, sliding_window, min(seq, 512 if seq % 512 == 0 else 128), interpret)
    zeros = jnp.zeros((batch, seq), jnp.int32)
    q_seg = zeros if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = zeros if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    if kv_mask is not None:
        kv_seg = jnp.where(kv_mask, kv_seg, PADDING_SEGMENT)
    heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # [batch, heads, seq, head_dim]

    def one(q, k, v, qs, ks):
        return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=qs, kv=ks))

    q = heads_first(query * jnp.asarray(scale, query.dtype))
    out = jax.vmap(one)(q, heads_first(key), heads_first(value), q_seg, kv_seg)
    out = heads_first(out).astype(query.dtype)
    if kv_mask is not None or q_segment_ids is not None:  # rows that see nothing: zeros, like the reference
        sees = jnp.any(attention_mask(seq, seq, kv_mask=kv_mask, causal=causal, sliding_window=sliding_window,
                                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids), axis=-1)
        out = jnp.where(sees[:, 0, :, None, None], out, 0).astype(out.dtype)
    return out
