"""The decode engine: prefill, extend and decode programs over a KV cache, the decode state's
layout on a mesh, and `Engine`, one model's compiled programs with its parameters.

    state = prefill(model, params, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                    max_columns=...)                            # left-padded prompts into a fresh cache
    state = extend(model, params, state, new_ids, new_mask)    # more tokens after the cache's columns
    state = decode(model, params, state, tokens)               # one token per row
    engine = Engine(model, params, stop_ids=..., mesh=mesh)
    state, token, done = engine.first(engine.place(inputs), keys, max_columns=..., sampling=...)

Prefill runs the whole (left-padded) prompt once: the images go through the vision tower and the
Perceiver once, and every decoder layer's keys and values fill a `KVCache` (a ring buffer as long
as the sliding window). Decoding then feeds one token per step. After a row's stop token its
remaining tokens are `pad_id`, as transformers' `generate` does.

On a device mesh (`Engine(..., mesh=make_mesh(data, fsdp, tensor))`) the parameters are placed by
the rule table of `idefics_jax.sharding` (tensor parallel over heads / MLP / vocabulary, fsdp over
the model width), the batch is split over data and fsdp, and the KV cache over batch and
key/value heads, as the keys are computed (`state_laid_out`); sampled tokens are replicated. An
axis that does not divide a dimension (a batch of 3 over data=2, 2 key/value heads over tensor=4)
leaves it whole.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idefics_jax.inference.sampling import Sampling, next_token, seen_tokens, token_keys
from idefics_jax.models.idefics2 import check_image_token_count
from idefics_jax.models.kv_cache import KVCache
from idefics_jax.models.quantize import is_quantized, quantized_shardings
from idefics_jax.sharding import (LOGICAL_AXIS_RULES, batch_sharding, constrain, fit_sharding, param_shardings,
                                  placed_on, put_everywhere)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    positions: jax.Array  # int32 [batch]: RoPE position of each row's next token
    logits: jax.Array  # float32 [batch, vocab]: the distribution of each row's next token
    seen: jax.Array | None = None  # bool [batch, vocab]: the tokens so far (for a repetition penalty)


def prefill(model, params, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
            max_columns: int, cache_length: int | None = None) -> DecodeState:
    """Runs the left-padded prompt `[batch, prompt]` into a fresh cache sized for `max_columns`
    (a ring buffer as long as the window; `cache_length` slots instead: one that never wraps)."""
    batch = input_ids.shape[0]
    cache = KVCache.create(model.config.text, batch, max_columns, model.dtype, length=cache_length)
    start = DecodeState(cache=cache, positions=jnp.zeros((batch,), jnp.int32), logits=None)
    return extend(model, params, start, input_ids, attention_mask, pixel_values, pixel_attention_mask)


def extend(model, params, state: DecodeState, input_ids, attention_mask, pixel_values=None,
           pixel_attention_mask=None) -> DecodeState:
    """Runs left-padded new tokens `[batch, seq]` (and their images) into the cache after its columns;
    their positions count on from `state.positions`. Returns the distribution after the last column."""
    attention_mask = attention_mask.astype(jnp.int32)
    # as transformers' generate: real tokens count up, left padding takes the first real one's position
    positions = state.positions[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)

    def last_logits(module):
        hidden, new_cache = module.hidden_states(
            input_ids, attention_mask=attention_mask, positions=positions, pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask, cache=state.cache)
        return module.logits(hidden[:, -1]), new_cache  # left padding: the last column is real

    logits, cache = model.apply({"params": params}, method=last_logits)
    return state.replace(cache=cache, positions=state.positions + attention_mask.sum(axis=1).astype(jnp.int32),
                         logits=logits.astype(jnp.float32))


def decode(model, params, state: DecodeState, tokens) -> DecodeState:
    """Appends one token per row (`[batch]`) and computes the next distribution."""
    positions = state.positions[:, None]
    logits, cache = model.apply({"params": params}, tokens[:, None].astype(jnp.int32),
                                attention_mask=jnp.ones_like(positions), positions=positions, cache=state.cache)
    return state.replace(cache=cache, positions=state.positions + 1, logits=logits[:, -1].astype(jnp.float32))


def check_context(config, tokens: int, max_new_tokens: int, what: str = "prompt"):
    """Raises ValueError unless `tokens` real tokens and `max_new_tokens` new ones fit the model's context."""
    context = config.text.max_position_embeddings
    if tokens + max_new_tokens > context:
        raise ValueError(f"The {what} has {tokens} tokens and {max_new_tokens} new ones were asked for: "
                         f"{tokens + max_new_tokens} is more than the model's context of {context} tokens")


def state_laid_out(state: DecodeState) -> DecodeState:
    """The decode state's layout on a mesh: cache over batch and key/value heads, per-row arrays over batch."""
    cache = state.cache
    kv = lambda t: constrain(t, "activation_batch", "kv_heads", None, None)  # [batch, kv_heads, length, head_dim]
    rows = lambda t: constrain(t, "activation_batch", None)
    cache = cache.replace(keys=tuple(map(kv, cache.keys)), values=tuple(map(kv, cache.values)),
                          positions=rows(cache.positions), valid=rows(cache.valid))
    seen = None if state.seen is None else rows(state.seen)
    return state.replace(cache=cache, logits=rows(state.logits), seen=seen)


def _laid_out(state: DecodeState, token, done):
    """The state laid out as `state_laid_out`, the tokens and done flags replicated."""
    return state_laid_out(state), constrain(token, None), constrain(done, None)


def _chosen(state, keys, t, sampling, stop_ids):
    """The `t`-th new token of each row (`keys`: the rows' keys, `row_keys`) from the state's logits."""
    token = next_token(state.logits, sampling, token_keys(keys, t), state.seen)
    return _laid_out(state, token, jnp.isin(token, jnp.asarray(stop_ids, jnp.int32)))


def first_token(model, params, inputs, keys, *, max_columns, sampling, stop_ids, pad_id, cache_length=None):
    """Prefill of `inputs` (left-padded ids, mask, pixels, pixel mask) into a fresh cache, and each
    row's first new token: `(state, token [batch], done [batch])`."""
    state = prefill(model, params, *inputs, max_columns=max_columns, cache_length=cache_length)
    if sampling.penalised:
        state = state.replace(seen=seen_tokens(inputs[0], inputs[1], state.logits.shape[-1]))
    return _chosen(state, keys, 0, sampling, stop_ids)


def continued(model, params, state, column, positions, seen, inputs, keys, *, sampling, stop_ids, pad_id):
    """A cache that has not wrapped, cut back to its first `column` columns (next positions `[batch]`),
    then the new tokens `inputs` run into it; `seen`: the whole conversation's tokens, or None
    without a repetition penalty."""
    state = state.replace(cache=state.cache.rewound(column), positions=positions, seen=seen)
    return _chosen(extend(model, params, state, *inputs), keys, 0, sampling, stop_ids)


def decode_step(model, params, state, token, done, keys, t, *, sampling, stop_ids, pad_id):
    """Feeds `token` `[batch]`; returns (state, the `t`-th new token, done). Finished rows emit `pad_id`."""
    state = decode(model, params, state, token)
    if sampling.penalised:
        state = state.replace(seen=state.seen.at[jnp.arange(token.shape[0]), token].set(True))
    token = jnp.where(done, pad_id, next_token(state.logits, sampling, token_keys(keys, t), state.seen))
    return _laid_out(state, token, done | jnp.isin(token, jnp.asarray(stop_ids, jnp.int32)))


def generate_loop(model, params, inputs, keys, *, max_new_tokens, max_columns, sampling, stop_ids, pad_id):
    """Prefill and the whole decode loop on the device (a `while_loop` that ends when every row is
    done): new tokens int32 `[batch, max_new_tokens]`, `pad_id` after a row's stop token."""
    settings = dict(sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)
    state, token, done = first_token(model, params, inputs, keys, max_columns=max_columns, **settings)
    batch = token.shape[0]
    tokens = constrain(jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token), None, None)

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, state, token, done, tokens = carry
        state, token, done = decode_step(model, params, state, token, done, keys, t, **settings)
        return t + 1, state, token, done, tokens.at[:, t].set(token)

    carry = (jnp.int32(1), state, token, done, tokens)
    return jax.lax.while_loop(cond, body, carry)[4]


@functools.lru_cache(maxsize=8)
def _programs(model, rules):
    """The jitted programs of one model, shared by its engines (equal models are equal modules),
    so that an engine made again, for new parameters or another mesh, reuses what was compiled
    for the same shapes, shardings and mesh. Keyed by the rule table too: tracing reads it, and
    jit's own cache does not see it."""
    del rules
    statics = ("max_columns", "sampling", "stop_ids", "pad_id")
    return (jax.jit(functools.partial(generate_loop, model), static_argnames=("max_new_tokens",) + statics),
            jax.jit(functools.partial(first_token, model), static_argnames=statics + ("cache_length",)),
            jax.jit(functools.partial(continued, model), donate_argnums=(1,), static_argnames=statics[1:]),
            jax.jit(functools.partial(decode_step, model), static_argnames=statics[1:], donate_argnums=(1,)))


def hashable_rules(rules):
    """A logical-axis rule table as a hashable key (what program caches are keyed by)."""
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


class Engine:
    """One model's decode programs with its parameters, on one device or a mesh: what `Generator`,
    `Conversation` and `Batcher` run. Compiled programs are kept per shape and shared by every
    engine of an equal model and rule table.

    mesh: a `(data, fsdp, tensor)` mesh (`idefics_jax.sharding.make_mesh`) to decode on several
    devices; the parameters are placed on it here (see the module docstring)."""

    def __init__(self, model, params, *, stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
                 rules=LOGICAL_AXIS_RULES):
        self.model, self.mesh, self.rules = model, mesh, rules
        self.use_params(params)
        self.stop_ids, self.pad_id = tuple(int(i) for i in stop_ids), int(pad_id)
        self.rules_key = hashable_rules(rules)  # what program caches are keyed by
        # the jitted programs (for tracing and cost analysis; call them through the methods below)
        self.generate_program, self.first_program, self.continued_program, self.step_program = \
            _programs(model, self.rules_key)

    def use_params(self, params):
        """Decodes with `params` from now on (placed on the mesh by the rule table, unless every
        leaf is on this mesh already, as a checkpoint read into its shards is; the compiled programs
        are kept)."""
        if self.mesh is None or placed_on(params, self.mesh):
            self.params = params
        else:
            shardings = param_shardings(self.model, self.mesh, self.rules)
            if is_quantized(params):  # int8 weights: each scale split as its kernel's output axis
                shardings = quantized_shardings(shardings, params)
            self.params = put_everywhere(params, shardings)

    def on_mesh(self):
        """The mesh and the rule table in context (tracing reads them); nothing without a mesh."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def place(self, inputs):
        """Prompt arrays onto the mesh, rows over (data, fsdp) where they divide; as given without a mesh."""
        if self.mesh is None:
            return inputs
        place = lambda x: None if x is None else put_everywhere(
            x, fit_sharding(np.shape(x), batch_sharding(self.mesh, np.ndim(x), self.rules)))
        return tuple(place(x) for x in inputs)

    def check(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> int:
        """Raises ValueError naming what is wrong with left-padded prompts `[batch, prompt]` (shapes,
        padding side, the context, image tokens against images); returns the columns they need."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if np.shape(input_ids) != np.shape(attention_mask) or np.ndim(input_ids) != 2:
            raise ValueError(f"input_ids {np.shape(input_ids)} and attention_mask {np.shape(attention_mask)} must "
                             f"both be [batch, prompt]")
        mask = np.asarray(attention_mask)
        if not mask[:, -1].all():
            raise ValueError("Prompts must be left padded: every row's last column must be a real token")
        config = self.model.config
        check_context(config, int(mask.sum(axis=1).max()), max_new_tokens)
        if pixel_values is not None:
            check_image_token_count(input_ids, pixel_values, config.image_token_id, config.image_seq_len)
        elif (np.asarray(input_ids)[mask.astype(bool)] == config.image_token_id).any():
            raise ValueError(f"The prompt has image tokens (id {config.image_token_id}) but no images were given")
        return np.shape(input_ids)[1] + max_new_tokens

    def first(self, inputs, keys, *, max_columns: int, sampling: Sampling, cache_length: int | None = None):
        """Prefill of placed `inputs` (ids, mask, pixels, pixel mask) into a fresh cache, and each row's
        first token: `(state, token [batch], done [batch])`."""
        with self.on_mesh():
            return self.first_program(self.params, inputs, keys, max_columns=max_columns, sampling=sampling,
                                      stop_ids=self.stop_ids, pad_id=self.pad_id, cache_length=cache_length)

    def continued(self, state: DecodeState, column: int, positions, seen, inputs, keys, *, sampling: Sampling):
        """A cache that has not wrapped, cut back to its first `column` columns (next positions
        `[batch]`), then placed `inputs` run into it (`seen`: the whole conversation's tokens, or None
        without a repetition penalty): `(state, token, done)`. Consumes `state`."""
        with self.on_mesh():
            return self.continued_program(self.params, state, jnp.int32(column), positions, seen, inputs, keys,
                                          sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)

    def decode_step(self, state: DecodeState, token, done, keys, t: int, *, sampling: Sampling):
        """Feeds `token` `[batch]`: `(state, the t-th new token, done)`; finished rows emit `pad_id`.
        Consumes `state`."""
        with self.on_mesh():
            return self.step_program(self.params, state, token, done, keys, jnp.int32(t), sampling=sampling,
                                     stop_ids=self.stop_ids, pad_id=self.pad_id)
