"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p; a repetition
penalty with either.

The logits are processed in the order of Hugging Face's `generate` (the repetition penalty, then
temperature, top-k and top-p), with the same tie and boundary rules, so the same settings keep the
same tokens. One difference: the penalty counts the tokens of the prompt and of the answer so far,
not the pad id of left padding (which transformers penalises in padded rows).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0, top_p 1.0 and min_p 0.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL's: seen tokens' logits divided by it (multiplied when negative); 1.0 off
    min_p: float = 0.0  # keeps the tokens at least min_p times as likely as the most likely one

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 is off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether choosing needs the tokens seen so far (`seen_tokens`)."""
        return self.repetition_penalty != 1.0


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


def min_p_filter(logits, min_p: float):
    """Min-p filter (Nguyen et al. 2024) on `[batch, vocab]`: keeps the tokens whose probability is
    at least `min_p` times the most likely token's, -inf elsewhere."""
    if min_p <= 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), NEG_INF, logits)


def seen_tokens(tokens, mask, vocab: int):
    """bool `[batch, vocab]`: which ids occur among `tokens` `[batch, seq]` where `mask` is set."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, tokens].max(mask.astype(bool))


def repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty (Keskar et al. 2019) on `[batch, vocab]`: a seen token's logit is divided by
    `penalty` when positive, multiplied when negative."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def process_logits(logits, sampling: Sampling, seen=None):
    """`[batch, vocab]` float32 logits -> the logits the token is chosen from (argmax when greedy);
    `seen` bool `[batch, vocab]`, the prompt's and answer's tokens, when `sampling.penalised`."""
    logits = logits.astype(jnp.float32)
    if sampling.penalised:
        logits = repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    logits = top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)
    return min_p_filter(logits, sampling.min_p)  # after top-k and top-p, as transformers orders them


def next_token(logits, sampling: Sampling, rng, seen=None):
    """`[batch, vocab]` logits -> int32 `[batch]` tokens; `seen` as in `process_logits`."""
    logits = process_logits(logits, sampling, seen)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
