"""Image-conditioned generation with a KV cache.

    generator = Generator(Idefics2(config), params, stop_ids=(eou_id, eos_id), pad_id=0)
    new_tokens = generator.generate(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                    max_new_tokens=32, sampling=Sampling(temperature=0.7, top_p=0.9))
    for tokens in generator.stream(...):   # [batch] per step, as they are chosen
        ...

Prefill runs the whole (left-padded) prompt once: the images go through the vision tower and the
Perceiver once, and every decoder layer's keys and values fill a `KVCache` (a ring buffer as long
as the sliding window). Decoding then feeds one token per step. `generate` runs the whole loop on
the device (`lax.while_loop`, stopping when every row has produced a stop token);
`stream` runs the same jitted step from the host, one token per call, for streaming output.
After a row's stop token its remaining tokens are `pad_id`, as transformers' `generate` does.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.inference.sampling import GREEDY, Sampling, next_token
from idefics_jax.models.idefics2 import check_image_token_count
from idefics_jax.models.kv_cache import KVCache


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    positions: jax.Array  # int32 [batch]: RoPE position of each row's next token
    logits: jax.Array  # float32 [batch, vocab]: the distribution of each row's next token


def prefill(model, params, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
            max_columns: int) -> DecodeState:
    """Runs the left-padded prompt `[batch, prompt]` into a fresh cache sized for `max_columns`."""
    batch = input_ids.shape[0]
    attention_mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)  # as transformers' generate
    cache = KVCache.create(model.config.text, batch, max_columns, model.dtype)

    def last_logits(module):
        hidden, new_cache = module.hidden_states(
            input_ids, attention_mask=attention_mask, positions=positions, pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask, cache=cache)
        return module.logits(hidden[:, -1]), new_cache  # left padding: the last column is real

    logits, cache = model.apply({"params": params}, method=last_logits)
    return DecodeState(cache=cache, positions=attention_mask.sum(axis=1).astype(jnp.int32),
                       logits=logits.astype(jnp.float32))


def decode(model, params, state: DecodeState, tokens) -> DecodeState:
    """Appends one token per row (`[batch]`) and computes the next distribution."""
    positions = state.positions[:, None]
    logits, cache = model.apply({"params": params}, tokens[:, None].astype(jnp.int32),
                                attention_mask=jnp.ones_like(positions), positions=positions, cache=state.cache)
    return DecodeState(cache=cache, positions=state.positions + 1, logits=logits[:, -1].astype(jnp.float32))


def _first(model, params, inputs, rng, *, max_columns, sampling, stop_ids, pad_id):
    state = prefill(model, params, *inputs, max_columns=max_columns)
    token = next_token(state.logits, sampling, rng)
    return state, token, jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))


def _step(model, params, state, token, done, rng, *, sampling, stop_ids, pad_id):
    """Feeds `token` `[batch]`; returns (state, next token, done). Finished rows emit `pad_id`."""
    state = decode(model, params, state, token)
    token = jnp.where(done, pad_id, next_token(state.logits, sampling, rng))
    return state, token, done | jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))


def _generate(model, params, inputs, rng, *, max_new_tokens, max_columns, sampling, stop_ids, pad_id):
    settings = dict(sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)
    rng, first_rng = jax.random.split(rng)
    state, token, done = _first(model, params, inputs, first_rng, max_columns=max_columns, **settings)
    batch = token.shape[0]
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, state, token, done, tokens, rng = carry
        rng, step_rng = jax.random.split(rng)
        state, token, done = _step(model, params, state, token, done, step_rng, **settings)
        return t + 1, state, token, done, tokens.at[:, t].set(token), rng

    carry = (jnp.int32(1), state, token, done, tokens, rng)
    return jax.lax.while_loop(cond, body, carry)[4]


class Generator:
    """Cached generation for one model and its parameters; compiled programs are kept per shape."""

    def __init__(self, model, params, *, stop_ids: Sequence[int] = (), pad_id: int = 0):
        self.model, self.params = model, params
        self.stop_ids, self.pad_id = tuple(int(i) for i in stop_ids), int(pad_id)
        statics = ("max_columns", "sampling", "stop_ids", "pad_id")
        self._generate = jax.jit(functools.partial(_generate, model), static_argnames=("max_new_tokens",) + statics)
        self._first = jax.jit(functools.partial(_first, model), static_argnames=statics)
        self._step = jax.jit(functools.partial(_step, model), static_argnames=statics[1:], donate_argnums=(1,))

    def _check(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> int:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if np.shape(input_ids) != np.shape(attention_mask) or np.ndim(input_ids) != 2:
            raise ValueError(f"input_ids {np.shape(input_ids)} and attention_mask {np.shape(attention_mask)} must "
                             f"both be [batch, prompt]")
        mask = np.asarray(attention_mask)
        if not mask[:, -1].all():
            raise ValueError("Prompts must be left padded: every row's last column must be a real token")
        context = self.model.config.text.max_position_embeddings
        longest = int(mask.sum(axis=1).max())
        if longest + max_new_tokens > context:
            raise ValueError(f"The prompt has {longest} tokens and {max_new_tokens} new ones were asked for: "
                             f"{longest + max_new_tokens} is more than the model's context of {context} tokens")
        config = self.model.config
        if pixel_values is not None:
            check_image_token_count(input_ids, pixel_values, config.image_token_id, config.image_seq_len)
        elif (np.asarray(input_ids)[mask.astype(bool)] == config.image_token_id).any():
            raise ValueError(f"The prompt has image tokens (id {config.image_token_id}) but no images were given")
        return np.shape(input_ids)[1] + max_new_tokens

    def generate(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
                 max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> np.ndarray:
        """Left-padded prompts `[batch, prompt]` -> new tokens int32 `[batch, max_new_tokens]`."""
        max_columns = self._check(input_ids, attention_mask, pixel_values, max_new_tokens)
        inputs = (input_ids, attention_mask, pixel_values, pixel_attention_mask)
        out = self._generate(self.params, inputs, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                             max_columns=max_columns, sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)
        return np.asarray(out)

    def stream(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
               max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> Iterator[np.ndarray]:
        """Yields each step's tokens `[batch]` as soon as they are chosen; stops when all rows are done."""
        max_columns = self._check(input_ids, attention_mask, pixel_values, max_new_tokens)
        settings = dict(sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)
        rng, first_rng = jax.random.split(jax.random.PRNGKey(seed))
        inputs = (input_ids, attention_mask, pixel_values, pixel_attention_mask)
        state, token, done = self._first(self.params, inputs, first_rng, max_columns=max_columns, **settings)
        yield np.asarray(token)
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                return
            rng, step_rng = jax.random.split(rng)
            state, token, done = self._step(self.params, state, token, done, step_rng, **settings)
            yield np.asarray(token)
