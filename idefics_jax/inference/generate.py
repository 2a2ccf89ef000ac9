"""Image-conditioned generation with a KV cache.

    generator = Generator(Idefics2(config), params, stop_ids=(eou_id, eos_id), pad_id=0)
    new_tokens = generator.generate(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                    max_new_tokens=32, sampling=Sampling(temperature=0.7, top_p=0.9))
    for tokens in generator.stream(...):   # [batch] per step, as they are chosen
        ...

`generate` runs the whole loop on the device (`lax.while_loop`, stopping when every row has
produced a stop token); `stream` runs the engine's decode step from the host, one token per call,
for streaming output. Prefill, decode, the cache and placement on a mesh are `inference.engine`'s.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from idefics_jax.inference.engine import DecodeState, Engine
from idefics_jax.inference.sampling import GREEDY, Sampling, row_keys


class Generator(Engine):
    """Cached generation for one model and its parameters (an `Engine` with whole-batch loops);
    compiled programs are kept per shape."""

    def generate(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
                 max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> np.ndarray:
        """Left-padded prompts `[batch, prompt]` -> new tokens int32 `[batch, max_new_tokens]`."""
        max_columns = self.check(input_ids, attention_mask, pixel_values, max_new_tokens)
        inputs = self.place((input_ids, attention_mask, pixel_values, pixel_attention_mask))
        with self.on_mesh():
            out = self.generate_program(self.params, inputs, row_keys(seed, len(input_ids)),
                                        max_new_tokens=max_new_tokens, max_columns=max_columns, sampling=sampling,
                                        stop_ids=self.stop_ids, pad_id=self.pad_id)
        return np.asarray(out)

    def stream(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
               max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> Iterator[np.ndarray]:
        """Yields each step's tokens `[batch]` as soon as they are chosen; stops when all rows are done."""
        max_columns = self.check(input_ids, attention_mask, pixel_values, max_new_tokens)
        keys = row_keys(seed, len(input_ids))
        inputs = self.place((input_ids, attention_mask, pixel_values, pixel_attention_mask))
        first = self.first(inputs, keys, max_columns=max_columns, sampling=sampling)
        for token, _ in self.steps(first, keys, max_new_tokens=max_new_tokens, sampling=sampling):
            yield token

    def steps(self, first, keys, *, max_new_tokens: int, sampling: Sampling) -> Iterator[tuple[np.ndarray, DecodeState]]:
        """The decode loop from the host: `first` is (state, token, done) after a prefill with the
        rows' `keys` (`row_keys`); yields (tokens `[batch]`, the state whose cache holds every column
        before them) until all rows are done or `max_new_tokens` were yielded. Each step consumes
        (donates) the state before it."""
        state, token, done = first
        yield np.asarray(token), state
        for t in range(1, max_new_tokens):
            if bool(done.all()):
                return
            state, token, done = self.decode_step(state, token, done, keys, t, sampling=sampling)
            yield np.asarray(token), state
