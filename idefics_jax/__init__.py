"""idefics_jax: Idefics2 (and its successors Idefics3 and SmolVLM) in JAX/Flax, numerically equal to
Hugging Face transformers' models."""

from idefics_jax.config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from idefics_jax.checkpoints import load_checkpoint, load_hf_checkpoint, save_checkpoint, save_hf_checkpoint
from idefics_jax.models.idefics2 import Idefics2, Idefics3, SmolVLM

__all__ = [
    "Idefics2",
    "Idefics2Config",
    "Idefics3",
    "SmolVLM",
    "PerceiverConfig",
    "TextConfig",
    "VisionConfig",
    "load_checkpoint",
    "load_hf_checkpoint",
    "save_checkpoint",
    "save_hf_checkpoint",
]
__version__ = "0.1.0"
