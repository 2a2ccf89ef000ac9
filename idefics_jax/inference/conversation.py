"""A conversation that keeps its KV cache between turns, so each turn prefills only what is new.

A chat sends the whole conversation every turn: the earlier turns, their images and the answers
just generated. `Conversation` compares the turn's tokens with the columns its cache holds, keeps
the longest common prefix (the answer as re-tokenized from its text may differ from the tokens
generated, and a cut never splits an image's tokens), and runs only the rest through the model:
the earlier images are not encoded again and the earlier text is not prefilled again.

    conversation = Conversation(generator, image_token_id=32001, image_seq_len=64)
    for token in conversation.stream(token_ids, sub_images, max_new_tokens=64):   # one row
        ...

Here the cache is as long as the conversation's columns (`KVCache.create(length=...)`, grown in
steps of `length_multiple`), not a ring buffer: it never wraps, so it can be cut back to any column.
Its attention masks by stored positions, which keeps the sliding window exact however long it
grows. Each turn's new tokens are left padded to a multiple of `prompt_multiple` and its images to
a multiple of `image_multiple` pixels, so a chat compiles a bounded number of programs.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.data.image_processing import pad_images
from idefics_jax.inference.engine import DecodeState, check_context
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import GREEDY, Sampling, row_keys, seen_tokens


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@functools.partial(jax.jit, static_argnames="length")
def _grown(state: DecodeState, length: int) -> DecodeState:
    return state.replace(cache=state.cache.resized(length))


class Conversation:
    """One row's token-level conversation on a `Generator`, its KV cache kept between `stream` calls."""

    def __init__(self, generator: Generator, *, image_token_id: int, image_seq_len: int, prompt_multiple: int = 32,
                 image_multiple: int = 1, length_multiple: int = 256):
        if generator.model.config.architecture != "fully_autoregressive":
            raise ValueError(f"A conversation that keeps its cache between turns needs a fully autoregressive model; "
                             f"this one is '{generator.model.config.architecture}' (its cached images are not cut back "
                             f"with the columns): answer each turn whole with Assistant.reply")
        self.generator = generator
        self.image_token_id, self.image_seq_len = int(image_token_id), int(image_seq_len)
        self.prompt_multiple, self.image_multiple, self.length_multiple = prompt_multiple, image_multiple, length_multiple
        self.reset()

    def reset(self):
        """Forgets the cache: the next turn prefills everything."""
        self.state = None  # DecodeState whose cache holds the tokens below
        self.tokens: list[int] = []  # the real tokens the cache holds, in order
        self.as_image: list[bool] = []  # whether each one went in as an image latent
        self.columns: list[int] = []  # each one's column (padding between turns takes columns too)
        self.reused = 0  # how many of the last turn's tokens the cache already held

    @property
    def cached_tokens(self) -> int:
        return len(self.tokens)

    def shared_prefix(self, input_ids: Sequence[int]) -> int:
        """How many leading tokens of `input_ids` the cache holds already, as they would go in now,
        ending on a whole image and leaving at least the last token to run."""
        is_image = [t == self.image_token_id for t in input_ids]
        shared, limit = 0, min(len(self.tokens), len(input_ids) - 1)
        while (shared < limit and self.tokens[shared] == input_ids[shared]
               and self.as_image[shared] == is_image[shared]):
            shared += 1
        if is_image[shared]:  # the cut falls inside an image (or at its start): keep none of its tokens
            shared -= sum(is_image[:shared]) % self.image_seq_len
        return shared

    def _check(self, input_ids, images, max_new_tokens: int):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not len(input_ids):
            raise ValueError("The conversation has no tokens")
        image_tokens = sum(t == self.image_token_id for t in input_ids)
        if image_tokens != len(images) * self.image_seq_len:
            raise ValueError(f"The conversation has {image_tokens} image tokens but there are {len(images)} images x "
                             f"{self.image_seq_len} latents = {len(images) * self.image_seq_len} image features")
        check_context(self.generator.model.config, len(input_ids), max_new_tokens, what="conversation")

    def stream(self, input_ids: Sequence[int], images: Sequence[np.ndarray] = (), *,
               max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0) -> Iterator[int]:
        """The whole conversation's token ids (no padding) and its processed (sub-)images in order,
        one array `[h, w, 3]` per run of `image_seq_len` image tokens (`ImageProcessor.process_image`
        gives one per image, five when split) -> yields the new tokens as they are chosen.

        Only the tokens after the shared prefix run through the model, with the images among them.
        Stops after a stop token or `max_new_tokens`; the cache then holds the conversation and every
        token yielded but the last (also when the caller stops early)."""
        input_ids = [int(t) for t in input_ids]
        self._check(input_ids, images, max_new_tokens)
        shared = self.shared_prefix(input_ids) if self.state is not None else 0
        new = input_ids[shared:]
        padded = round_up(len(new), self.prompt_multiple)
        ids = np.full((1, padded), self.generator.pad_id, np.int32)
        ids[0, padded - len(new):] = new
        mask = (np.arange(padded) >= padded - len(new)).astype(np.int32)[None]
        first_image = sum(t == self.image_token_id for t in input_ids[:shared]) // self.image_seq_len
        pixels = (None, None)
        if len(images) > first_image:  # the images among the new tokens, padded to a multiple of image_multiple
            size = [round_up(max(image.shape[axis] for image in images[first_image:]), self.image_multiple)
                    for axis in (0, 1)]
            padded_images = pad_images([images[first_image:]], size=tuple(size))
            pixels = (padded_images["pixel_values"], padded_images["pixel_attention_mask"])
        inputs = self.generator.place((ids, mask) + pixels)

        start = self.columns[shared - 1] + 1 if shared else 0  # the new tokens' first column
        length = round_up(start + padded + max_new_tokens, self.length_multiple)
        keys = row_keys(seed, 1)
        state, kept = self.state, (self.tokens[:shared], self.as_image[:shared], self.columns[:shared])
        self.reset()  # the call below consumes (donates) the state; the turn is recorded at the end
        self.reused = shared
        if shared:
            if state.cache.length < length:
                with self.generator.on_mesh():
                    state = _grown(state, length)
            seen = None
            if sampling.penalised:  # the whole conversation's tokens
                seen = seen_tokens(np.asarray([input_ids]), np.ones((1, len(input_ids)), bool),
                                   state.logits.shape[-1])
            first = self.generator.continued(state, start, jnp.full((1,), shared, jnp.int32), seen, inputs, keys,
                                             sampling=sampling)
        else:
            first = self.generator.first(inputs, keys, max_columns=padded + max_new_tokens, cache_length=length,
                                         sampling=sampling)
        yielded, latest = [], None
        try:
            for token, latest in self.generator.steps(first, keys, max_new_tokens=max_new_tokens, sampling=sampling):
                yielded.append(int(token[0]))
                yield yielded[-1]
        finally:
            # the latest state's cache holds the conversation and every token yielded but the last,
            # unless a failed step consumed it
            if latest is not None and not any(x.is_deleted() for x in jax.tree.leaves(latest)):
                fed = yielded[:-1]
                self.state = latest
                self.tokens = kept[0] + new + fed
                self.as_image = kept[1] + [t == self.image_token_id for t in new] + [False] * len(fed)
                self.columns = kept[2] + list(range(start + padded - len(new), start + padded + len(fed)))
