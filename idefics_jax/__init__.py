"""idefics_jax: Idefics2 in JAX/Flax, numerically equal to Hugging Face transformers' Idefics2."""

from idefics_jax.config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from idefics_jax.checkpoints import load_checkpoint, load_hf_checkpoint, save_checkpoint, save_hf_checkpoint
from idefics_jax.models.idefics2 import Idefics2

__all__ = [
    "Idefics2",
    "Idefics2Config",
    "PerceiverConfig",
    "TextConfig",
    "VisionConfig",
    "load_checkpoint",
    "load_hf_checkpoint",
    "save_checkpoint",
    "save_hf_checkpoint",
]
__version__ = "0.1.0"
