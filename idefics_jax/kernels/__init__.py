"""Pallas kernels: flash attention (any mask `ops.attention` describes) and Perceiver pooling.

Each computes exactly what the pure-jnp reference in `ops.attention` computes; the tests compare
them in interpret mode on CPU. Builds: `flash` / `perceiver_pooling` lower through Triton on
GPU, `flash_tpu` through Mosaic on TPU; `flash_mgpu` is the Hopper (Mosaic GPU) build of the flash
forward and backward (dQ and dK / dV), `flash.Blocks(forward="mgpu", backward="mgpu")`: the default
on Hopper for bfloat16 / float16 at head dims 64-128, where either backward follows either forward.
`ops.attention.dot_product_attention(implementation="pallas")` is how the model reaches them (the
TPU build on a TPU backend, the Triton build elsewhere).
"""

from idefics_jax.kernels.flash import Blocks, flash_attention
from idefics_jax.kernels.flash_tpu import flash_attention_tpu, perceiver_pooling_tpu
from idefics_jax.kernels.perceiver_pooling import MAX_LATENTS, perceiver_pooling

__all__ = ["MAX_LATENTS", "Blocks", "flash_attention", "flash_attention_tpu", "perceiver_pooling",
           "perceiver_pooling_tpu"]
