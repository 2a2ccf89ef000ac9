"""Continuous batching: requests join and leave one running decode loop.

    batcher = Batcher(generator, rows=8)
    row = batcher.admit(input_ids, attention_mask, pixel_values, pixel_attention_mask,   # [1, prompt]
                        max_new_tokens=64, sampling=Sampling(temperature=0.7), seed=3)
    tokens = batcher.step()        # int32 [rows]: the next token of every row (busy rows' are theirs)
    tokens = batcher.advance(4)    # int32 [rows, 4]: the next 4, in one device call
    batcher.release(row)           # when its request is done: the row takes the next one
    batcher.generate_all([Request(inputs, max_new_tokens=32), ...])   # a list answered offline, so batched

`rows` requests decode together in one KV cache of `rows` x `length` slots, a ring buffer as
`KVCache` is (`length`: the sliding window, or `max_columns` when that is shorter). Each step
chooses every row's next token with that row's own settings (`RowSampling`, keys per request,
`sampling.row_keys`) and feeds it: one compiled decode program serves every mix of requests. A
request joins between steps: its prompt is prefilled alone (with its images), and its columns are
copied into a free row so that they end where the running cache's next column is; the slots before
them hold nothing valid for that row. Attention masks by each slot's stored position and validity,
so the row then decodes as it would alone: its answer is the one `Generator.generate` gives it
(its tokens depend on its own seed only). The shared column index wraps around the ring, so a
server runs for ever; a request must fit the cache (`prompt + max_new_tokens <= length`) unless the
cache is as long as the window, which then hides what the ring overwrites.

On a mesh (the `Generator`'s) the cache is split over rows and key/value heads, as in `Generator`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.inference.engine import DecodeState, decode, prefill, state_laid_out
from idefics_jax.inference.sampling import GREEDY, RowSampling, Sampling, next_token_rows, row_keys, seen_tokens, token_keys
from idefics_jax.models.kv_cache import KVCache, cache_length


@flax.struct.dataclass
class Rows:
    state: DecodeState  # [rows, ...]; `seen` always kept (rows with a repetition penalty read it)
    sampling: RowSampling  # [rows] each
    keys: jax.Array  # uint32 [rows, 2]: each request's key (`row_keys(seed, 1)`)
    chosen: jax.Array  # int32 [rows]: tokens chosen so far for the row's request


def _laid(rows: Rows) -> Rows:
    return rows.replace(state=state_laid_out(rows.state))


def _empty(model, *, rows: int, length: int) -> Rows:
    config = model.config.text
    cache = KVCache.create(config, rows, length, model.dtype).replace(fresh=False)
    state = DecodeState(cache=cache, positions=jnp.zeros((rows,), jnp.int32),
                        logits=jnp.zeros((rows, config.vocab_size), jnp.float32),
                        seen=jnp.zeros((rows, config.vocab_size), bool))
    sampling = RowSampling.of([GREEDY] * rows)
    return _laid(Rows(state=state, sampling=jax.tree.map(jnp.asarray, sampling),
                      keys=jnp.zeros((rows, 2), jnp.uint32), chosen=jnp.zeros((rows,), jnp.int32)))


def _admitted(model, params, rows: Rows, inputs, row, sampling: RowSampling, key) -> Rows:
    """`rows` with the prompt `inputs` (`[1, prompt]`, left padded, and its images) prefilled into
    row `row`: its last `min(prompt, length)` columns end at the cache's next column."""
    prompt = inputs[0].shape[1]
    new = prefill(model, params, *inputs, max_columns=prompt, cache_length=prompt)
    big = rows.state.cache
    keep = min(prompt, big.length)
    slots = (big.index - keep + jnp.arange(keep)) % big.length  # this row's columns, oldest first

    def put(table, small, axis):
        """`small` [1, ..., prompt, ...]'s last `keep` columns into row `row` of `table` [rows, ..., length, ...]."""
        taken = jax.lax.slice_in_dim(small[0], prompt - keep, prompt, axis=axis - 1)
        placed = jnp.moveaxis(jnp.zeros_like(jnp.moveaxis(table[0], axis - 1, 0)).at[slots].set(
            jnp.moveaxis(taken, axis - 1, 0).astype(table.dtype)), 0, axis - 1)
        return table.at[row].set(placed)

    cache = big.replace(keys=tuple(put(b, s, 2) for b, s in zip(big.keys, new.cache.keys)),
                        values=tuple(put(b, s, 2) for b, s in zip(big.values, new.cache.values)),
                        positions=put(big.positions, new.cache.positions, 1), valid=put(big.valid, new.cache.valid, 1))
    at_row = lambda table, value: table.at[row].set(value[0].astype(table.dtype))
    state = rows.state.replace(cache=cache, positions=at_row(rows.state.positions, new.positions),
                               logits=at_row(rows.state.logits, new.logits),
                               seen=at_row(rows.state.seen, seen_tokens(inputs[0], inputs[1], new.logits.shape[-1])))
    return _laid(rows.replace(state=state, sampling=jax.tree.map(at_row, rows.sampling, sampling),
                              keys=at_row(rows.keys, key), chosen=rows.chosen.at[row].set(0)))


def _advanced(model, params, rows: Rows, *, n: int):
    """`n` steps, each choosing every row's next token (from its logits, with its settings) and
    feeding it back: (rows, tokens `[rows, n]`)."""

    def step(rows: Rows, _):
        state = rows.state
        token = next_token_rows(state.logits, rows.sampling, token_keys(rows.keys, rows.chosen), state.seen)
        state = decode(model, params, state, token)
        cache = state.cache.replace(index=state.cache.index % state.cache.length)  # the ring's slot is what counts
        state = state.replace(cache=cache, seen=state.seen.at[jnp.arange(token.shape[0]), token].set(True))
        return _laid(rows.replace(state=state, chosen=rows.chosen + 1)), token

    rows, tokens = jax.lax.scan(step, rows, length=n)
    return rows, tokens.T


@functools.lru_cache(maxsize=8)
def _programs(model, rules):
    """The jitted programs of one model (as `engine._programs`: keyed by the rule table too)."""
    del rules
    return (jax.jit(functools.partial(_empty, model), static_argnames=("rows", "length")),
            jax.jit(functools.partial(_admitted, model), donate_argnums=(1,)),
            jax.jit(functools.partial(_advanced, model), static_argnames=("n",), donate_argnums=(1,)))


class Batcher:
    """`rows` requests decoding together; see the module docstring.

    max_columns: the longest request (prompt + new tokens) to serve, by default the model's context;
    the cache holds `min(sliding window, max_columns)` columns per row."""

    def __init__(self, generator, *, rows: int = 8, max_columns: int | None = None):
        config = generator.model.config.text
        if generator.model.config.architecture != "fully_autoregressive":
            raise ValueError(f"Continuous batching serves fully autoregressive models; this one is "
                             f"'{generator.model.config.architecture}', whose images live beside the cache's rows: "
                             f"use Generator.generate (python -m idefics_jax.generate) for it")
        if rows < 1:
            raise ValueError(f"A batcher needs at least one row, got rows={rows}")
        self.generator, self.rows = generator, rows
        self.max_columns = max_columns or config.max_position_embeddings
        self.length = cache_length(config, self.max_columns)
        self.wraps = config.sliding_window is not None and self.length == config.sliding_window
        self._empty, self._admit, self._advance = _programs(generator.model, generator.rules_key)
        self.reset()

    def reset(self):
        """Every row free, in a fresh cache (after a failed program, which may have consumed the state)."""
        with self.generator.on_mesh():
            self.state = self._empty(rows=self.rows, length=self.length)
        self.busy = [False] * self.rows
        self.steps = 0  # steps run since (the cache's column index is this modulo its length)

    @property
    def free(self) -> int:
        return self.busy.count(False)

    def check(self, prompt_tokens: int, max_new_tokens: int):
        """Raises ValueError unless a request of `prompt_tokens` real tokens and `max_new_tokens` fits."""
        if not self.wraps and prompt_tokens + max_new_tokens > self.length:
            raise ValueError(f"The prompt has {prompt_tokens} tokens and {max_new_tokens} new ones were asked "
                             f"for: {prompt_tokens + max_new_tokens} is more than the {self.length} columns each "
                             f"request may take here (max_columns)")

    def admit(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
              max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> int:
        """Prefills one request (`[1, prompt]`, left padded) into a free row and returns the row; its
        first token comes with the next `step`. ValueError naming the problem for a request that
        cannot be served (the batch goes on), RuntimeError when every row is busy."""
        if np.shape(input_ids)[0] != 1:
            raise ValueError(f"admit() takes one request, [1, prompt]; got {np.shape(input_ids)}")
        self.generator.check(input_ids, attention_mask, pixel_values, max_new_tokens)
        self.check(int(np.sum(attention_mask)), max_new_tokens)
        if not self.free:
            raise RuntimeError(f"All {self.rows} rows are busy: release one first")
        row = self.busy.index(False)
        inputs = self.generator.place((input_ids, attention_mask, pixel_values, pixel_attention_mask))
        settings = jax.tree.map(jnp.asarray, RowSampling.of([sampling]))
        with self.generator.on_mesh():
            self.state = self._admit(self.generator.params, self.state, inputs, jnp.int32(row), settings,
                                     row_keys(seed, 1))
        self.busy[row] = True
        return row

    def step(self) -> np.ndarray:
        """The next token of every row, int32 `[rows]` (a free row's is meaningless)."""
        return self.advance(1)[:, 0]

    def advance(self, n: int) -> np.ndarray:
        """The next `n` tokens of every row, int32 `[rows, n]`, in one device call (one host round
        trip instead of `n`). A request that ends inside them (stop token, `max_new_tokens`) has
        decoded past its end: drop its later tokens and release its row as usual (admission resets
        the whole row, and a row never reads another's)."""
        if n < 1:
            raise ValueError(f"advance() takes n >= 1 tokens, got {n}")
        with self.generator.on_mesh():
            self.state, tokens = self._advance(self.generator.params, self.state, n=n)
        self.steps += n
        return np.asarray(tokens)

    def release(self, row: int):
        """Frees `row` for the next request (what it holds is overwritten when one is admitted)."""
        self.busy[row] = False

    def generate_all(self, requests: Sequence[Request], *, chunk: int = 1) -> list[list[int]]:
        """Answers `requests` offline, continuously batched: each joins as soon as a row is free (in
        order) and leaves after `max_new_tokens` or its first stop token (the Generator's `stop_ids`,
        kept at the end of its tokens). `chunk`: tokens per device call (`advance`); requests join
        between calls. Returns each request's new tokens, in order."""
        waiting, running, done = list(range(len(requests))), {}, {}
        stop_ids = set(self.generator.stop_ids)
        while waiting or running:
            while waiting and self.free:
                i = waiting.pop(0)
                request = requests[i]
                running[self.admit(*request.inputs, max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                                   seed=request.seed)] = (i, [])
            tokens = self.advance(chunk)
            for row, (i, out) in list(running.items()):
                for token in tokens[row]:
                    out.append(int(token))
                    if len(out) == requests[i].max_new_tokens or out[-1] in stop_ids:
                        done[i] = out
                        self.release(row)
                        del running[row]
                        break
        return [done[i] for i in range(len(requests))]


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt for `Batcher.generate_all`: `inputs` is (input_ids, attention_mask, pixel_values,
    pixel_attention_mask), `[1, prompt]` left padded (the images None without any)."""

    inputs: tuple
    max_new_tokens: int
    sampling: Sampling = GREEDY
    seed: int = 0
