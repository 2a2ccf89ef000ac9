"""The one attention entry point of the model.

Every attention in Idefics2 (SigLIP's bidirectional self-attention, the Perceiver's latents over
[context; latents], Mistral's causal sliding-window attention) calls `dot_product_attention`.
The mask is described, not materialised, by the caller: key padding, causality, a sliding window
and packed-segment ids. That lets kernels that never build an `[q, kv]` mask (Pallas flash
attention, cuDNN, splash) replace the reference below without touching the model.

Implementations: "xla" (the pure-jnp reference, always available). Kernels register more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


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


def dot_product_attention(
    query,  # [batch, q_len, heads, head_dim]
    key,  # [batch, kv_len, kv_heads, head_dim]
    value,  # [batch, kv_len, kv_heads, head_dim]
    *,
    scale: float | None = None,
    kv_mask=None,
    causal: bool = False,
    sliding_window: int | None = None,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    implementation: str = "xla",
):
    """Multi-head attention with grouped-query heads; returns `[batch, q_len, heads, head_dim]`.

    `heads` must be a multiple of `kv_heads` (GQA: each group of `heads // kv_heads` query heads
    shares one key/value head). A query with no visible key returns zeros, never NaN.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation '{implementation}'; available: {IMPLEMENTATIONS}")
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    scale = head_dim**-0.5 if scale is None else scale
    mask = attention_mask(
        q_len, kv_len, kv_mask=kv_mask, causal=causal, sliding_window=sliding_window,
        q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )
    return _xla_attention(query, key, value, mask, scale)


def _xla_attention(query, key, value, mask, scale):
    """Reference: scores in float32, masked softmax, weights cast back to the value dtype."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scale)  # [batch, kv_heads, groups, q_len, kv_len]
    mask = mask[:, :, None]  # [batch, 1, 1, q_len, kv_len]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(mask, weights, 0.0).astype(value.dtype)  # rows with no key: all zero
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value)
    return out.reshape(batch, q_len, heads, head_dim)
