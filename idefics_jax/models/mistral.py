"""Mistral decoder: RoPE, grouped-query attention, sliding-window causal mask, RMSNorm, SwiGLU.

Takes input embeddings (the text embeddings with image latents already spliced in) and returns
the final normed hidden states. Module names follow Hugging Face's `MistralModel`
(`embed_tokens`, `layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, `norm`), which are also
`LlamaModel`'s: with `sliding_window=None` and its RoPE (`rope_type`) this is the Llama decoder of
Idefics3 and SmolVLM.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from idefics_jax.config import TextConfig
from idefics_jax.models.kv_cache import KVCache, LayerCache
from idefics_jax.models.layers import Embed, GatedMLP, RMSNorm, apply_rotary, dense, rope_inv_freq, rotary_cos_sin
from idefics_jax.models.remat import KEY, QUERY, VALUE, name_activation, remat_layer
from idefics_jax.models.scan import scanned
from idefics_jax.ops.attention import dot_product_attention
from idefics_jax.sharding import ACTIVATION_AXES, constrain

Dtype = Any


class MistralAttention(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, positions, kv_mask, segment_ids, past: LayerCache | None = None):
        """x [batch, seq, hidden]; cos / sin [batch, seq, head_dim]; positions [batch, seq].

        past: generation, this layer's `LayerCache`. Prefill: the new tokens attend to the cached
        columns and their own; returns (output [batch, seq, hidden], (keys, values) of the new tokens
        `[batch, seq, kv_heads, head_dim]`, after RoPE: what the cache stores). A decode step
        (`past.slot` set): the new column is written into the cache first and the query attends
        over the cache alone; returns (output, the written `LayerCache`).
        """
        cfg = self.config
        head_dim = cfg.attention_head_dim
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, init_std=cfg.initializer_range)
        split = lambda t: einops.rearrange(t, "b s (h d) -> b s h d", d=head_dim)
        seq_major = lambda t: einops.rearrange(t, "b h s d -> b s h d")  # the cache's layout -> attention's
        q = dense(cfg.num_attention_heads * head_dim, ("embed", "heads"), name="q_proj", **kw)(x)
        k = dense(cfg.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(x)
        v = dense(cfg.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(x)
        # tagged for the remat policies that keep the projections (models/remat.py)
        q, k, v = (split(name_activation(t, name)) for t, name in ((q, QUERY), (k, KEY), (v, VALUE)))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Without a cache, causality and the window go by index within the row, as in Hugging Face
        # (the same as by position for packed rows, whose positions count up by one within each
        # segment): then the TPU's splash kernel, which masks by index, can serve training. With a
        # cache, the new tokens are placed among the cached columns by their stored positions.
        keys, values, q_positions, kv_positions, new = k, v, None, None, (k, v)
        if past is not None and past.slot is not None:  # decode: the column into its slot, then the cache
            new = past.write(k, v)
            keys, values = seq_major(new.keys).astype(k.dtype), seq_major(new.values).astype(v.dtype)
            q_positions, kv_positions, kv_mask = positions, past.positions, past.valid
        elif past is not None:  # prefill: the cached columns, then the new ones
            keys = jnp.concatenate([seq_major(past.keys).astype(k.dtype), k], axis=1)
            values = jnp.concatenate([seq_major(past.values).astype(v.dtype), v], axis=1)
            q_positions, kv_positions = positions, jnp.concatenate([past.positions, positions], axis=1)
            new_valid = jnp.ones(positions.shape, bool) if kv_mask is None else kv_mask
            kv_mask = jnp.concatenate([past.valid, new_valid], axis=1)
        out = dot_product_attention(
            q, keys, values, kv_mask=kv_mask, causal=True, sliding_window=cfg.sliding_window,
            q_positions=q_positions, kv_positions=kv_positions,
            q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
            implementation=self.attention_impl,
        )  # [batch, seq, heads, head_dim]
        out = einops.rearrange(out, "b s h d -> b s (h d)")
        return dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out), new


class MistralDecoderLayer(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, positions, kv_mask, segment_ids, past: LayerCache | None = None):
        """Returns (x [batch, seq, hidden], what the attention returns of the cache); see MistralAttention."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, *ACTIVATION_AXES)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn, kv = MistralAttention(cfg, self.attention_impl, name="self_attn", **kw)(
            h, cos, sin, positions, kv_mask, segment_ids, past)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, cfg.initializer_range,
                       name="mlp", **kw)
        return x + mlp(h), kv


class MistralModel(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # a policy of models/remat.py
    scan_layers: bool = False  # one nn.scan over the layers, parameters stacked (see models/scan.py)

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, rows_axis="vocab",
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            **kw,
        )
        if self.scan_layers:  # carry x; broadcast cos, sin, positions, kv_mask, segment_ids
            self.layers = scanned(MistralDecoderLayer, cfg.num_hidden_layers, remat=self.remat, broadcast_args=5)(
                cfg, self.attention_impl, **kw)
        else:
            layer = remat_layer(MistralDecoderLayer, self.remat)
            self.layers = [layer(cfg, self.attention_impl, **kw) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

    def embed(self, input_ids):  # [batch, seq] -> [batch, seq, hidden]
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, *, attention_mask=None, positions=None, segment_ids=None,
                 cache: KVCache | None = None, before_layer=None):
        """inputs_embeds `[batch, seq, hidden]` -> final hidden states `[batch, seq, hidden]`.

        attention_mask `[batch, seq]`: 0 marks padding keys (Hugging Face's convention).
        positions `[batch, seq]`: RoPE positions; default `0 .. seq - 1`. Causality goes by index
        within the row (Hugging Face's convention), or, with a cache that holds columns, by these positions.
        segment_ids `[batch, seq]`: packed rows; tokens attend within their segment only.
        cache: generation. The new tokens also attend to the cached columns, and the call returns
        `(hidden states, cache with the new columns written)`.
        before_layer: `(layer index, x) -> x`, run before each layer (the gated cross-attention
        blocks of `models/cross_attention.py`); not with `scan_layers`.
        """
        batch, seq, _ = inputs_embeds.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        cos, sin = rotary_cos_sin(positions, rope_inv_freq(self.config))
        kv_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = inputs_embeds.astype(self.dtype)
        if self.scan_layers:
            if before_layer is not None:
                raise ValueError("Blocks between the decoder layers (architecture='cross_attention') need the "
                                 "unscanned decoder: scan_layers=False")
            if cache is not None:
                raise ValueError("Decoding with a KV cache needs the unscanned model: scan_layers=False, with "
                                 "idefics_jax.models.scan.unstack_layers(params)")
            x, _ = self.layers(x, cos, sin, positions, kv_mask, segment_ids)
            return self.norm(x)
        valid = jnp.ones((batch, seq), bool) if kv_mask is None else kv_mask
        slot = None
        if cache is not None and seq == 1 and not cache.fresh:  # decode: positions / valid, then each layer
            cache, slot = cache.written(positions, valid)       # writes its column
        written = []
        for i, layer in enumerate(self.layers):
            # a fresh cache holds nothing to attend to: prefill is an uncached pass (by index: the same
            # as by position for left-padded rows) whose keys and values are then written
            past = None if cache is None or cache.fresh else cache.layer(i, slot)
            if before_layer is not None:
                x = before_layer(i, x)
            x, new = layer(x, cos, sin, positions, kv_mask, segment_ids, past)
            written.append(new)
        x = self.norm(x)
        if cache is None:
            return x
        if slot is not None:
            return x, cache.replace(keys=tuple(w.keys for w in written), values=tuple(w.values for w in written))
        return x, cache.update([k for k, _ in written], [v for _, v in written], positions, valid)

    def attend(self, hidden):  # tied output projection: [batch, seq, hidden] -> [batch, seq, vocab]
        return self.embed_tokens.attend(hidden)
