"""Gated cross-attention: the paper's other architecture (Flamingo, Idefics1), `architecture="cross_attention"`.

Instead of taking places in the decoder's sequence, each image leaves one `<image>` marker token
there, and its features (the connector's output, `[images, features, hidden]`) are read by gated
cross-attention blocks placed before every `cross_attention_every`-th decoder layer:

    x = x + tanh(alpha_cross_attn) * cross_attn(input_layernorm(x), image features)
    x = x + tanh(alpha_dense) * mlp(post_attention_layernorm(x))

Both gates start at 0, so a new block starts as the identity and the pre-trained decoder's function
is kept at the start of training. A text token attends to the features of the images whose markers
stand at or before it in its own packed segment (by position and segment id, as the decoder's
causal mask); a token that sees no image skips the block (both residual branches are zero), so a
text-only segment is decoded as by the decoder alone, packed or not.

Module names follow Idefics1's `IdeficsGatedCrossAttentionLayer` (`gated_cross_attn_layers.N`,
`cross_attn.q_proj`, `alpha_cross_attn`, `alpha_dense`, ...); the queries and keys are not
normed (Idefics1's `qk_layer_norms=False`) and the heads are the decoder's (grouped-query).
"""

from __future__ import annotations

from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from idefics_jax.config import TextConfig
from idefics_jax.models.layers import GatedMLP, RMSNorm, dense
from idefics_jax.ops.attention import dot_product_attention
from idefics_jax.sharding import ACTIVATION_AXES, constrain

Dtype = Any


@flax.struct.dataclass
class ImageContext:
    """What the blocks attend to: every image's features, flattened, and where each one's marker stands.

    features [batch, keys, hidden] (keys = images x features per image, images in marker order);
    positions int32 [batch, keys]: the position of the image's marker; segments int32 [batch, keys]:
    its packed segment (None: rows are not packed); valid bool [batch, keys]: a real image.
    """

    features: Any
    positions: Any
    segments: Any
    valid: Any

    def concatenated(self, other: "ImageContext") -> "ImageContext":
        """These images, then `other`'s (a later call's, in generation)."""
        both = lambda a, b: None if a is None or b is None else jnp.concatenate([a, b], axis=1)
        return ImageContext(both(self.features, other.features.astype(self.features.dtype)),
                            both(self.positions, other.positions), both(self.segments, other.segments),
                            both(self.valid, other.valid))


def image_context(features, real_images, is_image, positions, segment_ids) -> ImageContext:
    """The context of a batch: features [batch, images, per image, hidden] (slots, padding slots
    included), real_images bool [batch, images], is_image bool [batch, seq] (the markers),
    positions int [batch, seq], segment_ids int [batch, seq] or None.

    The k-th marker of row b stands for row b's k-th real image (as in the fully autoregressive splice)."""
    batch, num_images, per_image, hidden = features.shape
    slots = jax.vmap(lambda r: jnp.nonzero(r, size=num_images, fill_value=0)[0])(real_images)  # real first
    markers = jax.vmap(lambda r: jnp.nonzero(r, size=num_images, fill_value=0)[0])(is_image)  # [batch, images]
    count = jnp.minimum(real_images.sum(axis=1), is_image.sum(axis=1))  # images with a marker
    ranked = jnp.take_along_axis(features, slots[:, :, None, None], axis=1)  # [batch, images, per image, hidden]
    per_key = lambda a: jnp.repeat(a, per_image, axis=1)  # [batch, images] -> [batch, keys]
    at_marker = lambda a: per_key(jnp.take_along_axis(a, markers, axis=1).astype(jnp.int32))
    return ImageContext(
        features=ranked.reshape(batch, num_images * per_image, hidden),
        positions=at_marker(positions),
        segments=None if segment_ids is None else at_marker(segment_ids),
        valid=per_key(jnp.arange(num_images)[None, :] < count[:, None]),
    )


class CrossAttention(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, context: ImageContext):
        """x [batch, seq, hidden] (queries); positions [batch, seq]; segment_ids [batch, seq] or None.
        Returns [batch, seq, hidden]; a token that sees no image gets zeros."""
        cfg = self.config
        head_dim = cfg.attention_head_dim
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, init_std=cfg.initializer_range)
        split = lambda t: einops.rearrange(t, "b s (h d) -> b s h d", d=head_dim)
        features = context.features.astype(self.dtype)
        q = split(dense(cfg.num_attention_heads * head_dim, ("embed", "heads"), name="q_proj", **kw)(x))
        k = split(dense(cfg.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(features))
        v = split(dense(cfg.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(features))
        packed = segment_ids is not None and context.segments is not None
        out = dot_product_attention(
            q, k, v, kv_mask=context.valid, causal=True, q_positions=positions, kv_positions=context.positions,
            q_segment_ids=segment_ids if packed else None, kv_segment_ids=context.segments if packed else None,
            implementation=self.attention_impl,
        )  # [batch, seq, heads, head_dim]
        out = einops.rearrange(out, "b s h d -> b s (h d)")
        return dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out)


def sees_an_image(positions, segment_ids, context: ImageContext):
    """bool [batch, seq]: the token has at least one image marked at or before it in its segment."""
    seen = context.valid[:, None, :] & (context.positions[:, None, :] <= positions[:, :, None])
    if segment_ids is not None and context.segments is not None:
        seen = seen & (context.segments[:, None, :] == segment_ids[:, :, None])
    return jnp.any(seen, axis=-1)


class GatedCrossAttentionLayer(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, context: ImageContext):
        """x [batch, seq, hidden] -> [batch, seq, hidden]: the identity while both gates are 0."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = lambda name: jnp.tanh(self.param(
            name, nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (1,), self.param_dtype))
        x = constrain(x, *ACTIVATION_AXES)
        sees = sees_an_image(positions, segment_ids, context)[..., None]  # [batch, seq, 1]
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn = CrossAttention(cfg, self.attention_impl, name="cross_attn", **kw)(h, positions, segment_ids, context)
        x = x + jnp.where(sees, gate("alpha_cross_attn").astype(self.dtype) * attn, 0)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, cfg.initializer_range, name="mlp", **kw)
        return x + jnp.where(sees, gate("alpha_dense").astype(self.dtype) * mlp(h), 0)
