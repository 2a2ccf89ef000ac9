"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p; a repetition
penalty with either.

The logits are processed in the order of Hugging Face's `generate` (the repetition penalty, then
temperature, top-k, top-p and min-p), with the same boundary rules, so the same settings keep the
same tokens. Differences: the penalty counts the tokens of the prompt and of the answer so far,
not the pad id of left padding (which transformers penalises in padded rows); top-p keeps every
token tied with its last kept one, as top-k does (transformers keeps whichever its sort put first).
Top-k and top-p look at each row's `CANDIDATES` most likely tokens (`lax.top_k`), then 16 times as
many, and sort the whole vocabulary only for a larger k or nucleus (`benchmarks/RESULTS.md`).

Random draws are per row: row i of a call with `seed` draws its t-th token with
`token_keys(row_keys(seed, batch), t)[i]`, so a row's tokens depend on its seed, its index and its
logits, never on the rows beside it (a request answers the same alone or batched with others).
`RowSampling` holds settings per row, as arrays, for a batch whose rows sample differently
(continuous batching); `next_token_rows` chooses with them exactly as `next_token` does per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np


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
CANDIDATES = 256  # top-k and top-p look at each row's 256 most likely tokens (`lax.top_k`), then at 16 times
# as many, and only for a larger k or nucleus sort the whole vocabulary: each tier costs several times the
# one before (benchmarks/sampling.py, RESULTS.md)


def _tiers(vocab: int) -> tuple[int, ...]:
    """How many of a row's most likely tokens the filters look at, in turn: `CANDIDATES`, 16 times
    as many, the whole vocabulary (those below the vocabulary's size)."""
    return tuple(sorted({min(CANDIDATES, vocab), min(16 * CANDIDATES, vocab), vocab}))


def _first_serving(tiers, compute, serves):
    """`compute(n)` for the first tier `n` that `serves`, trying them in turn (`lax.cond`): the
    larger tiers' work is done only when a smaller one falls short."""
    result = compute(tiers[0])
    if len(tiers) == 1:
        return result
    return jax.lax.cond(serves(tiers[0], result), lambda: result, lambda: _first_serving(tiers[1:], compute, serves))


def top_k_filter(logits, k: int):
    """Keeps the k largest logits of `[batch, vocab]` (ties at the k-th value kept too), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # the k-th largest as the smallest of the k, not `top_k(...)[..., -1]`: XLA:CPU turns a slice of
    # top_k's values into a sort of the whole row
    kth = jnp.min(jax.lax.top_k(logits, k)[0], axis=-1, keepdims=True)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p: float):
    """Nucleus filter on `[batch, vocab]`: keeps the most likely tokens whose probabilities sum to at
    least `p` (always at least one), -inf elsewhere."""
    if p >= 1.0:
        return logits
    return _nucleus(logits, np.float32(p), True)


def _nucleus(logits, p, used):
    """`top_p_filter`'s work (`p`: float32, or `[batch, 1]`; `used`: bool, or `[batch, 1]`, the rows
    whose result counts). Transformers' rule (sort ascending, drop the tokens whose cumulative
    probability is at most 1 - p) read from the top: a token is kept while the probability of the
    tokens more likely than it is below p; ties at the last kept logit are kept, as top-k keeps them.
    Each row's most likely tokens a tier at a time (`_tiers`), until every used row's nucleus fits.
    Every tier gives the same bits (sums within chunks of `CANDIDATES` tokens, then over the chunks
    one after another: a token's sum is the same whatever the tier), so a row's answer does not
    depend on its batch."""
    probs = jax.nn.softmax(logits, axis=-1)

    def smallest_kept(n):  # [batch, 1]: the lowest logit kept among each row's n most likely; their total mass
        top, index = jax.lax.top_k(logits, n)
        chunks = -(-n // CANDIDATES)
        pad = lambda x, value: jnp.pad(x, ((0, 0), (0, chunks * CANDIDATES - n)), constant_values=value)
        mass = pad(jnp.take_along_axis(probs, index, axis=-1), 0.0).reshape(-1, chunks, CANDIDATES)
        within = jnp.cumsum(mass, axis=-1)  # [batch, chunks, CANDIDATES]
        total, before = jax.lax.scan(lambda sum_, chunk: (sum_ + chunk, sum_), jnp.zeros_like(within[:, 0, -1:]),
                                     jnp.moveaxis(within[..., -1:], 1, 0))  # earlier chunks' mass, in order
        exclusive = jnp.concatenate([jnp.zeros_like(within[..., :1]), within[..., :-1]], axis=-1)
        above = (exclusive + jnp.moveaxis(before, 0, 1)).reshape(-1, chunks * CANDIDATES)
        return jnp.min(jnp.where(above < p, pad(top, NEG_INF), jnp.inf), axis=-1, keepdims=True), total

    fits = lambda n, result: jnp.all((result[1] >= p) | ~jnp.asarray(used))
    kept, _ = _first_serving(_tiers(logits.shape[-1]), smallest_kept, fits)
    return jnp.where(logits < kept, NEG_INF, logits)


def min_p_filter(logits, min_p: float):
    """Min-p filter (Nguyen et al. 2024) on `[batch, vocab]`: keeps the tokens whose probability is
    at least `min_p` times the most likely token's, -inf elsewhere."""
    if min_p <= 0.0:
        return logits
    return _min_p(logits, min_p)


def _min_p(logits, min_p):
    """`min_p_filter`'s work (`min_p`: a float, or `[batch, 1]`; 0 keeps every token)."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), NEG_INF, logits)


def seen_tokens(tokens, mask, vocab: int):
    """bool `[batch, vocab]`: which ids occur among `tokens` `[batch, seq]` where `mask` is set."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, tokens].max(mask.astype(bool))


def inverse(x: float) -> np.float32:
    """1 / x rounded to float32 on the host. Logits are divided by multiplying with it, in every
    path: XLA turns a division by a constant or a broadcast column into such a product anyway,
    and where it does depends on the program; one product keeps every path bit for bit the same."""
    return np.float32(1.0 / x)


def repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty (Keskar et al. 2019) on `[batch, vocab]`: a seen token's logit is divided by
    `penalty` when positive, multiplied when negative."""
    return _penalised(logits, seen, np.float32(penalty), inverse(penalty))


def _penalised(logits, seen, penalty, inverse_penalty):
    """`repetition_penalty`'s work (`penalty` and its `inverse`: float32 scalars, or `[batch, 1]`)."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits * inverse_penalty), logits)


def process_logits(logits, sampling: Sampling, seen=None):
    """`[batch, vocab]` float32 logits -> the logits the token is chosen from (argmax when greedy);
    `seen` bool `[batch, vocab]`, the prompt's and answer's tokens, when `sampling.penalised`."""
    logits = logits.astype(jnp.float32)
    if sampling.penalised:
        logits = repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    logits = logits * inverse(sampling.temperature)
    logits = top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)
    return min_p_filter(logits, sampling.min_p)  # after top-k and top-p, as transformers orders them


def row_keys(seed, batch: int):
    """uint32 `[batch, 2]`: each row's key for a call with `seed` (see the module docstring)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), jnp.arange(batch))


def token_keys(keys, t):
    """`[batch, 2]` row keys -> the keys of each row's `t`-th token (`t`: int, or int32 `[batch]`)."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(jnp.asarray(t, jnp.int32), keys.shape[:1]))


def _drawn(logits, keys):
    """One draw per row from `[batch, vocab]` logits with that row's key `[batch, 2]`."""
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits).astype(jnp.int32)


def next_token(logits, sampling: Sampling, keys, seen=None):
    """`[batch, vocab]` logits -> int32 `[batch]` tokens; `keys` `[batch, 2]`: this token's key per
    row (`token_keys`); `seen` as in `process_logits`. (Named `sampling` in the program, for profiles
    read per op class.)"""
    with jax.named_scope("sampling"):
        return _next_token(logits, sampling, keys, seen)


def _next_token(logits, sampling: Sampling, keys, seen):
    logits = process_logits(logits, sampling, seen)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _drawn(logits, keys)


@flax.struct.dataclass
class RowSampling:
    """`Sampling` per row: each field `[batch]`, computed on the host as the scalar path computes
    them (`inverse`), so that each row's logits come out bit for bit as that row's alone."""

    inverse_temperature: Any  # float32; 0 for greedy rows
    top_k: Any  # int32; 0 off
    top_p: Any  # float32; 1 off
    min_p: Any  # float32; 0 off
    repetition_penalty: Any  # float32; 1 off
    inverse_penalty: Any  # float32

    @classmethod
    def of(cls, settings: Sequence[Sampling]) -> "RowSampling":
        column = lambda values, dtype=np.float32: np.asarray(values, dtype)
        return cls(inverse_temperature=column([0.0 if s.greedy else inverse(s.temperature) for s in settings]),
                   top_k=column([s.top_k for s in settings], np.int32),
                   top_p=column([s.top_p for s in settings]),
                   min_p=column([s.min_p for s in settings]),
                   repetition_penalty=column([s.repetition_penalty for s in settings]),
                   inverse_penalty=column([inverse(s.repetition_penalty) for s in settings]))

    @property
    def greedy(self):
        return self.inverse_temperature == 0.0


def process_logits_rows(logits, rows: RowSampling, seen):
    """`process_logits` with each row's own settings (`rows`, fields `[batch]`); `seen` bool
    `[batch, vocab]` (read where a row's penalty is not 1). Greedy rows come back penalised only.
    A filter that no row uses is skipped (`lax.cond`): the sorts of top-k and top-p are most of
    a small model's decode step."""
    logits = logits.astype(jnp.float32)
    column = lambda x: x[:, None]
    penalty = column(rows.repetition_penalty)
    logits = _penalised(logits, seen & (penalty != 1.0), penalty, column(rows.inverse_penalty))
    greedy = column(rows.greedy)
    scaled = logits * column(rows.inverse_temperature)
    used = lambda setting, off: jnp.any((setting != off) & ~rows.greedy)
    scaled = jax.lax.cond(used(rows.top_k, 0), _top_k_rows, lambda x, _: x, scaled, column(rows.top_k))
    scaled = jax.lax.cond(used(rows.top_p, 1.0), _top_p_rows, lambda x, *_: x, scaled, column(rows.top_p), ~greedy)
    scaled = jax.lax.cond(used(rows.min_p, 0.0), _min_p, lambda x, _: x, scaled, column(rows.min_p))
    return jnp.where(greedy, logits, scaled)


def _top_k_rows(logits, k):
    """Each row's k largest logits (k `[batch, 1]`, 0: off), ties at the k-th kept, -inf elsewhere."""
    kth = lambda n: jnp.take_along_axis(jax.lax.top_k(logits, n)[0], jnp.clip(k - 1, 0, n - 1), axis=-1)
    # the k-th largest of a row's n most likely tokens is the row's k-th largest when k <= n
    threshold = _first_serving(_tiers(logits.shape[-1]), kth, lambda n, _: jnp.all(k <= n))
    return jnp.where((k > 0) & (logits < threshold), NEG_INF, logits)


def _top_p_rows(logits, p, used):
    """`top_p_filter` with each row's p (`p` `[batch, 1]`, 1: off)."""
    return jnp.where(p < 1.0, _nucleus(logits, p, used & (p < 1.0)), logits)


def next_token_rows(logits, rows: RowSampling, keys, seen):
    """`next_token` with each row's own settings: argmax for greedy rows, a draw for the others."""
    with jax.named_scope("sampling"):
        logits = process_logits_rows(logits, rows, seen)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        drawn = jax.lax.cond(jnp.all(rows.greedy), lambda: greedy, lambda: _drawn(logits, keys))  # none samples: no draw
        return jnp.where(rows.greedy, greedy, drawn)
