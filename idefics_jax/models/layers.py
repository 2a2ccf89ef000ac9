"""Building blocks shared by the towers: dense layers with logical axes, norms, SwiGLU, RoPE.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
names (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `norm`, ...). One rule table
(`idefics_jax.sharding.LOGICAL_AXIS_RULES`) maps those names onto mesh axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from idefics_jax.sharding import constrain

Dtype = Any


def flat_dot_general(inputs, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """A Dense layer's product with the input's leading axes merged into one (a free reshape):
    `[batch, seq, in] x [in, out]` as `[batch * seq, in] x [in, out]`. The weight gradient is then a
    plain matrix product contracting one axis; with two contracted axes XLA:CPU first copies the
    output gradient into a transposed layout, which makes the MLP's backward pass markedly slower.
    The batch axis is the major one, so its sharding carries over to the merged axis."""
    (contract_in, contract_kernel), batch_dims = dimension_numbers
    if inputs.ndim <= 2 or contract_in != (inputs.ndim - 1,) or contract_kernel != (0,) or batch_dims != ((), ()):
        return jax.lax.dot_general(inputs, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    flat = inputs.reshape(-1, inputs.shape[-1])
    out = jax.lax.dot_general(flat, kernel, (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(*inputs.shape[:-1], kernel.shape[-1])


class Dense(nn.Dense):
    """`nn.Dense`, which also runs int8 weights (`models/quantize.py`): a kernel stored as int8 beside
    a per-output-channel `kernel_scale` enters the product converted to the compute dtype, and the
    product is scaled: `(x @ q) * s = x @ (q * s)`."""

    def __call__(self, inputs):
        if not self.has_variable("params", "kernel_scale"):
            return super().__call__(inputs)
        dtype = self.dtype or inputs.dtype
        x = jnp.asarray(inputs, dtype)
        kernel = self.get_variable("params", "kernel").astype(dtype)
        y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        y = y * self.get_variable("params", "kernel_scale").astype(dtype)
        return y + self.get_variable("params", "bias").astype(dtype) if self.use_bias else y


def dense(features: int, axes: Sequence[str | None], *, use_bias: bool, dtype: Dtype, name: str | None = None,
          param_dtype: Dtype, init_std: float = 0.02) -> nn.Dense:
    """A Dense layer whose kernel `[in, out]` and bias `[out]` carry logical axis names `axes`."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        dot_general=flat_dot_general,
        name=name,
    )


class Embed(nn.Embed):
    """`nn.Embed` (the same `embedding` parameter) whose lookup first lays the table out whole along
    its features, rows split as `rows_axis` says: the table is gathered over `fsdp` before use, as
    every FSDP weight is. Looked up in a table split along `embed`, the rows come out split along
    `embed`; making those batch-split activations is a reshard the SPMD partitioner does by
    replicating them ("Involuntary full rematerialization": the global batch's embeddings on every
    device, in the forward pass and in the gradient's scatter)."""

    rows_axis: str | None = None  # logical name of the table's first axis ("vocab"; None: whole)

    def __call__(self, inputs):  # int [...] -> [..., features]
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"Embedding lookups take integer ids, got {inputs.dtype}")
        (table,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        return jnp.take(constrain(table, self.rows_axis, None), inputs, axis=0)


def activation(name: str):
    """Hugging Face activation names (`ACT2FN`) as JAX functions."""
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"Unsupported activation '{name}'")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled after casting back (as Hugging Face's Idefics2/Mistral)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., hidden]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],), self.param_dtype,
        )
        input_dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (jnp.asarray(scale, self.dtype) * x.astype(input_dtype)).astype(self.dtype)


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm with exact (two-pass) variance, as torch computes it."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class GatedMLP(nn.Module):
    """SwiGLU MLP `down(act(gate(x)) * up(x))`: Hugging Face's `Idefics2MLP` / `MistralMLP`."""

    intermediate_size: int
    output_size: int
    hidden_act: str = "silu"
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., in] -> [..., out]
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        hidden = activation(self.hidden_act)(gate) * up  # [..., intermediate]
        return dense(self.output_size, ("mlp", "embed"), name="down_proj", **kw)(hidden)


def rope_inv_freq(config):
    """RoPE's inverse frequencies `[head_dim / 2]` of a `TextConfig`, in float32 as Hugging Face
    computes them: the default's, or Llama 3's (`rope_type="llama3"`: wavelengths longer than the
    original context / low_freq_factor slowed by `rope_factor`, shorter than context /
    high_freq_factor kept, those between blended smoothly)."""
    head_dim = config.attention_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
    if config.rope_type == "default":
        return inv_freq
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_cos_sin(positions, inv_freq):
    """cos / sin tables `[batch, seq, head_dim]` for integer `positions` `[batch, seq]` and the
    inverse frequencies `[head_dim / 2]` (`rope_inv_freq`).

    Computed in float32 exactly as Hugging Face's RoPE (frequencies repeated, not interleaved).
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, seq, head_dim]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
    """Rotates `x` `[batch, seq, heads, head_dim]` by position (the `rotate_half` convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
