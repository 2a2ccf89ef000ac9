"""Inference: cached generation, sampling, loading a checkpoint with its processor, evaluation."""

from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import GREEDY, Sampling

__all__ = ["GREEDY", "Generator", "Sampling"]
