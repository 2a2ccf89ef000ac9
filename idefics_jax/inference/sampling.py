"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

The logits are processed in the order of Hugging Face's `generate` (temperature, then top-k,
then top-p), with the same tie and boundary rules, so the same settings keep the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()
NEG_INF = -jnp.inf


def top_k_filter(logits, k: int):
    """Keeps the k largest logits of `[batch, vocab]` (ties at the k-th value kept too), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p: float):
    """Nucleus filter on `[batch, vocab]`: keeps the most likely tokens whose probabilities sum to at
    least `p` (always at least one), -inf elsewhere."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1)  # ascending, as the reference sorts
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - p
    remove_sorted = remove_sorted.at[..., -1].set(False)  # keep the most likely token
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def process_logits(logits, sampling: Sampling):
    """`[batch, vocab]` float32 logits -> the logits sampling draws from."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    return top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)


def next_token(logits, sampling: Sampling, rng):
    """`[batch, vocab]` logits -> int32 `[batch]` tokens."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, process_logits(logits, sampling), axis=-1).astype(jnp.int32)
