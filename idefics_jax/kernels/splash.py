"""jax's TPU splash attention (Pallas / Mosaic) behind `ops.attention`'s contract.

Splash takes one example at a time, heads first (`[heads, seq, head_dim]`), a static mask object
(causal, local window, full) and optional segment ids; it does not scale the scores, and its
sequences are multiples of 128 (so ours are padded, the padding keys in a segment of their own). Padding keys
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

from idefics_jax.kernels.masking import attention_mask

PADDING_SEGMENT = -(2**30)  # a key segment no query carries


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, window: int | None, block: int, interpret: bool):
    shape = (q_len, kv_len)
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
    """query `[batch, q_len, heads, head_dim]`, key / value `[batch, kv_len, kv_heads, head_dim]`;
    masks by token index (no explicit positions). Causal or windowed attention needs
    q_len == kv_len. Lengths are padded to multiples of 128 (padding keys hidden by their segment)."""
    if q_positions is not None or kv_positions is not None:
        raise ValueError("splash attention masks by token index; explicit positions need 'xla' or 'pallas'")
    batch, q_len, heads, _ = query.shape
    kv_len = key.shape[1]
    if (causal or sliding_window is not None) and kv_len != q_len:
        raise ValueError(f"causal / windowed splash attention needs equal query and key lengths, got {q_len} "
                         f"and {kv_len}")
    round_up = lambda n: -(-n // 128) * 128
    sq, sk = round_up(q_len), round_up(kv_len)
    block = 512 if sq % 512 == 0 and sk % 512 == 0 else 128
    kernel = _kernel(heads, sq, sk, causal, sliding_window, block, interpret)
    zeros = lambda n: jnp.zeros((batch, n), jnp.int32)
    q_seg = zeros(q_len) if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = zeros(kv_len) if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    if kv_mask is not None:
        kv_seg = jnp.where(kv_mask, kv_seg, PADDING_SEGMENT)
    pad = lambda t, n, value=0: jnp.pad(t, [(0, 0), (0, n - t.shape[1])] + [(0, 0)] * (t.ndim - 2),
                                        constant_values=value)
    heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # [batch, heads, seq, head_dim]

    def one(q, k, v, qs, ks):
        return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=qs, kv=ks))

    q = heads_first(pad(query * jnp.asarray(scale, query.dtype), sq))
    out = jax.vmap(one)(q, heads_first(pad(key, sk)), heads_first(pad(value, sk)), pad(q_seg, sq),
                        pad(kv_seg, sk, PADDING_SEGMENT))
    out = heads_first(out)[:, :q_len].astype(query.dtype)
    if kv_mask is not None or q_segment_ids is not None:  # rows that see nothing: zeros, like the reference
        sees = jnp.any(attention_mask(q_len, kv_len, kv_mask=kv_mask, causal=causal, sliding_window=sliding_window,
                                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids), axis=-1)
        out = jnp.where(sees[:, 0, :, None, None], out, 0).astype(out.dtype)
    return out
