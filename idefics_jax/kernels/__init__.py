"""Pallas kernels: flash attention (any mask `ops.attention` describes) and Perceiver pooling.

Each computes exactly what the pure-jnp reference in `ops.attention` computes; the tests compare
them in interpret mode on CPU. `ops.attention.dot_product_attention(implementation="pallas")`
is how the model reaches them.
"""

from idefics_jax.kernels.flash import Blocks, flash_attention
from idefics_jax.kernels.perceiver_pooling import MAX_LATENTS, perceiver_pooling

__all__ = ["MAX_LATENTS", "Blocks", "flash_attention", "perceiver_pooling"]
