"""SigLIP vision tower as Idefics2 uses it: images at their native aspect ratio (NaViT style).

An image `[height, width, 3]` (channels last) padded into a batch comes with a patch attention
mask `[h_patches, w_patches]`. Each real patch gets the position id of the bucket its fractional
coordinate falls in on the pretrained `num_patches_per_side`^2 grid, so the position embeddings
stretch over the image whatever its size; padding patches are masked out of attention.

Module names follow Hugging Face's `Idefics2VisionTransformer` (`embeddings.patch_embedding`,
`encoder.layers.N.self_attn.q_proj`, `post_layernorm`).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from idefics_jax.config import VisionConfig
from idefics_jax.models.layers import Embed, activation, dense, layer_norm
from idefics_jax.models.remat import KEY, QUERY, VALUE, name_activation, remat_layer
from idefics_jax.models.scan import scanned
from idefics_jax.ops.attention import dot_product_attention

Dtype = Any


def patch_attention_mask(pixel_attention_mask, patch_size: int):
    """bool `[n, height, width]` -> bool `[n, height // p, width // p]`.

    A patch is real when every one of its pixels is (transformers 5's rule); pixels past the last
    whole patch are dropped, as the stride-`p` convolution drops them.
    """
    n, height, width = pixel_attention_mask.shape
    h, w = height // patch_size, width // patch_size
    mask = pixel_attention_mask[:, : h * patch_size, : w * patch_size].astype(jnp.int32)
    mask = einops.reduce(mask, "n (h p) (w q) -> n h w", "sum", p=patch_size, q=patch_size)
    return mask == patch_size * patch_size


def patch_position_ids(patch_mask, num_patches_per_side: int):
    """Position ids `[n, h * w]` for a patch mask `[n, h, w]`, bucketed as Hugging Face does it.

    A real image of `nh x nw` patches has fractional coordinates `i / nh` (float32), which are
    bucketed against the boundaries `k / num_patches_per_side`; padding patches get id 0.
    """
    n, h, w = patch_mask.shape
    # float32 boundaries exactly as torch.arange(1/N, 1.0, 1/N) makes them (double, then float32).
    side = num_patches_per_side
    boundaries = np.asarray([1.0 / side + (1.0 / side) * k for k in range(side - 1)]).astype(np.float32)
    boundaries = jnp.asarray(boundaries)  # [side - 1]

    def buckets(num_real, length):  # [n] -> [n, length]
        step = 1.0 / jnp.maximum(num_real, 1).astype(jnp.float32)
        coords = jnp.arange(length, dtype=jnp.float32)[None, :] * step[:, None]
        coords = jnp.minimum(coords, jnp.float32(1.0 - 1e-6))
        return jnp.sum(coords[..., None] >= boundaries, axis=-1)  # bucketize(right=True)

    bucket_h = buckets(patch_mask[:, :, 0].sum(axis=1), h)  # [n, h]
    bucket_w = buckets(patch_mask[:, 0, :].sum(axis=1), w)  # [n, w]
    ids = bucket_h[:, :, None] * side + bucket_w[:, None, :]  # [n, h, w]
    return jnp.where(patch_mask, ids, 0).reshape(n, h * w)


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, patch_mask):
        # pixel_values [n, height, width, channels]; patch_mask [n, h, w]
        cfg = self.config
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))  # [n, h, w, hidden]
        embeddings = einops.rearrange(patches, "n h w d -> n (h w) d")
        position_ids = patch_position_ids(patch_mask, cfg.num_patches_per_side)  # [n, h * w]
        position_embedding = Embed(
            cfg.num_patches_per_side**2,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), (None, "embed")),
            name="position_embedding",
        )
        return embeddings + position_embedding(position_ids)  # [n, patches, hidden]


class VisionAttention(nn.Module):
    config: VisionConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_mask):  # x [n, patches, hidden]; kv_mask [n, patches]
        cfg = self.config
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, init_std=cfg.initializer_range)
        split = lambda t: einops.rearrange(t, "n s (h d) -> n s h d", d=cfg.head_dim)
        q = dense(cfg.hidden_size, ("embed", "heads"), name="q_proj", **kw)(x)
        k = dense(cfg.hidden_size, ("embed", "heads"), name="k_proj", **kw)(x)
        v = dense(cfg.hidden_size, ("embed", "heads"), name="v_proj", **kw)(x)
        # tagged for the remat policies that keep the projections (models/remat.py)
        q, k, v = (split(name_activation(t, name)) for t, name in ((q, QUERY), (k, KEY), (v, VALUE)))
        out = dot_product_attention(q, k, v, kv_mask=kv_mask, implementation=self.attention_impl)
        out = einops.rearrange(out, "n s h d -> n s (h d)")
        return dense(cfg.hidden_size, ("heads", "embed"), name="out_proj", **kw)(out)


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [n, patches, hidden]
        cfg = self.config
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, init_std=cfg.initializer_range)
        x = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        x = activation(cfg.hidden_act)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class VisionEncoderLayer(nn.Module):
    config: VisionConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    scanned: bool = False  # inside nn.scan: return (carry, nothing per layer)

    @nn.compact
    def __call__(self, x, kv_mask):  # pre-norm transformer block
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", **kw)(x)
        x = x + VisionAttention(cfg, self.attention_impl, name="self_attn", **kw)(h, kv_mask)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", **kw)(x)
        x = x + VisionMLP(cfg, name="mlp", **kw)(h)
        return (x, None) if self.scanned else x


class VisionEncoder(nn.Module):
    config: VisionConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # a policy of models/remat.py
    scan_layers: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers:
            self.layers = scanned(VisionEncoderLayer, self.config.num_hidden_layers, remat=self.remat,
                                  broadcast_args=1)(self.config, self.attention_impl, scanned=True, **kw)
            return
        layer = remat_layer(VisionEncoderLayer, self.remat)
        self.layers = [layer(self.config, self.attention_impl, **kw) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x, kv_mask):
        if self.scan_layers:
            return self.layers(x, kv_mask)[0]
        for layer in self.layers:
            x = layer(x, kv_mask)
        return x


class VisionTransformer(nn.Module):
    """`pixel_values [n, height, width, 3]`, `patch_mask [n, h, w]` -> `[n, h * w, hidden]`."""

    config: VisionConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # a policy of models/remat.py
    scan_layers: bool = False

    @nn.compact
    def __call__(self, pixel_values, patch_mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if patch_mask is None:
            n, height, width, _ = pixel_values.shape
            patch_mask = jnp.ones((n, height // cfg.patch_size, width // cfg.patch_size), bool)
        x = VisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values, patch_mask)
        kv_mask = patch_mask.reshape(patch_mask.shape[0], -1)  # [n, patches]
        x = VisionEncoder(cfg, self.attention_impl, remat=self.remat, scan_layers=self.scan_layers, name="encoder",
                          **kw)(x, kv_mask)
        return layer_norm(cfg.layer_norm_eps, "post_layernorm", **kw)(x)
