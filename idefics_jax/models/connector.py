"""The connector: image patch features -> the decoder's image tokens, by `config.connector`.

* `perceiver` (Idefics2): a modality projection (SwiGLU MLP, vision width -> text width), then the
  Perceiver resampler, which turns each image's variable number of patch features into a fixed
  set of `resampler_n_latents` (64) latents: in every layer the latents attend over the
  concatenation [image context; latents] (grouped-query heads, RMSNorm), then pass through a
  SwiGLU MLP.
* `mlp` (the paper's "no pooling"): the same modality projection on every patch of the square
  image, one token each.
* `pixel_shuffle` (Idefics3): each r x r block of neighbouring patches concatenated into one
  feature (r^2 x the vision width), then one linear projection to the text width: r^2 fewer tokens.

The last two read the top-left `num_patches_per_side` square of the patch grid (a square image of
`vision.image_size`; a smaller grid is zero-padded to it). Module names follow Hugging Face's
`Idefics2Connector` (`modality_projection`, `perceiver_resampler.latents`,
`perceiver_resampler.layers.N.self_attn.q_proj`, ...) and `Idefics3Connector`
(`modality_projection.proj`).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from idefics_jax.config import Idefics2Config
from idefics_jax.models.layers import GatedMLP, RMSNorm, dense
from idefics_jax.models.remat import KEY, QUERY, VALUE, name_activation, remat_layer
from idefics_jax.ops.attention import dot_product_attention
from idefics_jax.sharding import ACTIVATION_AXES, constrain

Dtype = Any


class PerceiverAttention(nn.Module):
    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, context, kv_mask):
        # latents [n, latents, hidden]; context [n, patches, hidden]; kv_mask [n, patches + latents]
        p, hidden = self.config.perceiver, self.config.text.hidden_size
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, init_std=p.initializer_range)
        head_dim = p.resampler_head_dim
        states = jnp.concatenate([context, latents], axis=1)  # [n, patches + latents, hidden]
        q = dense(p.resampler_n_heads * head_dim, ("embed", "heads"), name="q_proj", **kw)(latents)
        k = dense(p.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(states)
        v = dense(p.num_key_value_heads * head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(states)
        q, k, v = name_activation(q, QUERY), name_activation(k, KEY), name_activation(v, VALUE)  # for remat policies
        split = lambda t: einops.rearrange(t, "n s (h d) -> n s h d", d=head_dim)
        out = dot_product_attention(split(q), split(k), split(v), kv_mask=kv_mask,
                                    implementation=self.attention_impl)  # [n, latents, heads, head_dim]
        out = einops.rearrange(out, "n s h d -> n s (h d)")
        return dense(hidden, ("heads", "embed"), name="o_proj", **kw)(out)


class PerceiverLayer(nn.Module):
    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, context, kv_mask):
        cfg = self.config
        hidden, eps = cfg.text.hidden_size, cfg.text.rms_norm_eps
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = latents
        latents = RMSNorm(eps, name="input_latents_norm", **kw)(latents)
        context = RMSNorm(eps, name="input_context_norm", **kw)(context)
        latents = residual + PerceiverAttention(cfg, self.attention_impl, name="self_attn", **kw)(
            latents, context, kv_mask)
        h = RMSNorm(eps, name="post_attention_layernorm", **kw)(latents)
        mlp = GatedMLP(4 * hidden, hidden, cfg.perceiver.hidden_act, cfg.perceiver.initializer_range,
                       name="mlp", **kw)
        return latents + mlp(h)


class PerceiverResampler(nn.Module):
    """`context [n, patches, hidden]`, `context_mask [n, patches]` -> `[n, n_latents, hidden]`."""

    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # a policy of models/remat.py

    def setup(self):
        p = self.config.perceiver
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Hugging Face fills the latents with ones (its weights are always loaded). From scratch that
        # starts all 64 latents equal, and their residual stream drowns the little the first
        # attention reads from the image: draw them small and different instead.
        self.latents = self.param(
            "latents", nn.with_logical_partitioning(nn.initializers.normal(p.initializer_range), (None, "embed")),
            (p.resampler_n_latents, self.config.text.hidden_size), self.param_dtype,
        )
        layer = remat_layer(PerceiverLayer, self.remat)
        self.layers = [layer(self.config, self.attention_impl, **kw) for _ in range(p.resampler_depth)]
        self.norm = RMSNorm(self.config.text.rms_norm_eps, **kw)

    def __call__(self, context, context_mask):
        n = context.shape[0]
        # images over the batch axes, features whole (the latents parameter is split along `embed`;
        # left so, its broadcast would pull the residual stream and the gradients into that layout)
        context = constrain(context, *ACTIVATION_AXES)
        latents = jnp.broadcast_to(jnp.asarray(self.latents, self.dtype), (n, *self.latents.shape))
        # every latent is a valid key: mask [n, patches + latents]
        kv_mask = jnp.concatenate([context_mask.astype(bool), jnp.ones(latents.shape[:2], bool)], axis=1)
        for layer in self.layers:
            latents = layer(constrain(latents, *ACTIVATION_AXES), context, kv_mask)
        return self.norm(latents)


def pixel_shuffle(grid, r: int):
    """[n, h, w, d] -> [n, (h / r) * (w / r), r * r * d]: each r x r block of patches as one feature,
    its rows in order, each row's patches in order (Idefics3's `pixel_shuffle`)."""
    return einops.rearrange(grid, "n (i a) (j c) d -> n (i j) (a c d)", a=r, c=r)


def square_grid(features, grid_mask, side: int):
    """features [n, h * w, d] on an h x w patch grid -> the grid's top-left `side` x `side` square
    `[n, side, side, d]` (zero-padded where the grid is smaller)."""
    n, h, w = grid_mask.shape
    grid = features.reshape(n, h, w, features.shape[-1])[:, :side, :side]
    return jnp.pad(grid, ((0, 0), (0, side - grid.shape[1]), (0, side - grid.shape[2]), (0, 0)))


class LinearProjection(nn.Module):
    """Idefics3's modality projection: one linear map without bias (`modality_projection.proj`)."""

    features: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., in] -> [..., features]
        return dense(self.features, ("mlp", "embed"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     init_std=self.init_std, name="proj")(x)


class Connector(nn.Module):
    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # a policy of models/remat.py

    @nn.compact
    def __call__(self, image_hidden_states, grid_mask):
        # image_hidden_states [n, patches, vision hidden]; grid_mask [n, h, w]: the real patches
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.connector == "pixel_shuffle":
            grid = square_grid(image_hidden_states, grid_mask, cfg.vision.num_patches_per_side)
            shuffled = pixel_shuffle(grid, cfg.pixel_shuffle_factor)  # [n, image_seq_len, r * r * vision hidden]
            return LinearProjection(cfg.text.hidden_size, cfg.text.initializer_range, name="modality_projection",
                                    **kw)(shuffled)
        projection = GatedMLP(cfg.text.intermediate_size, cfg.text.hidden_size, cfg.text.hidden_act,
                              cfg.text.initializer_range, name="modality_projection", **kw)
        if cfg.connector == "mlp":  # [n, image_seq_len, text hidden]
            grid = square_grid(image_hidden_states, grid_mask, cfg.vision.num_patches_per_side)
            return projection(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
        resampler = PerceiverResampler(cfg, self.attention_impl, remat=self.remat, name="perceiver_resampler", **kw)
        return resampler(projection(image_hidden_states), grid_mask.reshape(grid_mask.shape[0], -1))
