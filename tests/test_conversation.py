"""A conversation's KV cache kept between turns: each turn equals a fresh prefill of the whole conversation."""

from __future__ import annotations

import jax
import numpy as np

from conftest import IMAGE_TOKEN_ID, rel_err
from idefics_jax import Idefics2
from idefics_jax.data.image_processing import ImageProcessor, pad_images
from idefics_jax.inference.conversation import Conversation
from idefics_jax.inference.engine import prefill
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import Sampling

NEW = 6


def text(rng, n, avoid=()):
    return [int(t) for t in rng.choice(np.setdiff1d(np.arange(3, IMAGE_TOKEN_ID), avoid), size=n)]


def image_tokens(n_images, n_latents):
    return ([7] + [IMAGE_TOKEN_ID] * n_latents) * n_images + [7]  # a plain token stands for <fake_token_around_image>


def as_text(answer):
    """An answer as the next turn renders it: a generated image id is text there (ours: token 5)."""
    return [5 if t == IMAGE_TOKEN_ID else t for t in answer]


def common(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fresh(generator, ids, images, **kwargs):
    """The reference: the whole conversation prefilled into a new cache."""
    pixels = pad_images([images]) if images else {"pixel_values": None, "pixel_attention_mask": None}
    steps = generator.stream(np.asarray([ids]), np.ones((1, len(ids)), np.int32), pixels["pixel_values"],
                             pixels["pixel_attention_mask"], max_new_tokens=NEW, **kwargs)
    return [int(step[0]) for step in steps]


def test_turns_equal_fresh_prefills(converted, seed):
    """Four turns with images (split and whole), an answer cut back, sampling, a repetition penalty;
    the cache goes past the window."""
    rng = np.random.default_rng([seed, 700])
    config, params = converted
    latents = config.image_seq_len
    generator = Generator(Idefics2(config), params)
    conversation = Conversation(generator, image_token_id=IMAGE_TOKEN_ID, image_seq_len=latents, prompt_multiple=8,
                                image_multiple=8)
    split = ImageProcessor(longest_edge=48, shortest_edge=16, do_image_splitting=True)
    whole = ImageProcessor(longest_edge=48, shortest_edge=16)
    picture = lambda h, w: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    ids = text(rng, 3) + image_tokens(5, latents) + text(rng, 4)
    images = split.process_image(picture(30, 45))
    answer = list(conversation.stream(ids, images, max_new_tokens=NEW))
    assert answer == fresh(generator, ids, images) and conversation.reused == 0
    assert conversation.cached_tokens == len(ids) + len(answer) - 1

    # the next turn renders the answer without its last two tokens: the cache is cut back before them
    shared = len(ids) + common(answer, as_text(answer[:-2]))
    ids = ids + as_text(answer[:-2]) + text(rng, 5, avoid=answer[-2:]) + image_tokens(1, latents) + text(rng, 2)
    images = images + whole.process_image(picture(40, 20))
    answer = list(conversation.stream(ids, images, max_new_tokens=NEW))
    assert answer == fresh(generator, ids, images) and conversation.reused == shared

    sampling = Sampling(temperature=1.5, top_k=20, repetition_penalty=1.3)
    shared = len(ids) + common(answer[:-1], as_text(answer))
    ids = ids + as_text(answer) + text(rng, 9)
    answer = list(conversation.stream(ids, images, max_new_tokens=NEW, sampling=sampling, seed=3))
    assert answer == fresh(generator, ids, images, sampling=sampling, seed=3) and conversation.reused == shared
    assert conversation.state.cache.length > config.text.sliding_window

    # a turn whose new tokens start with an image
    shared = len(ids) + common(answer[:-1], as_text(answer))
    ids = ids + as_text(answer) + image_tokens(1, latents) + text(rng, 1)
    images = images + whole.process_image(picture(20, 44))
    penalised = Sampling(repetition_penalty=1.5)  # counts the whole conversation's tokens
    answer = list(conversation.stream(ids, images, max_new_tokens=NEW, sampling=penalised))
    assert answer == fresh(generator, ids, images, sampling=penalised) and conversation.reused == shared


def test_logits_after_a_turn_equal_a_fresh_prefill(converted, seed):
    rng = np.random.default_rng([seed, 701])
    config, params = converted
    model = Idefics2(config)
    conversation = Conversation(Generator(model, params), image_token_id=IMAGE_TOKEN_ID,
                                image_seq_len=config.image_seq_len)
    images = ImageProcessor(longest_edge=48, shortest_edge=16).process_image(
        rng.integers(0, 256, size=(36, 28, 3), dtype=np.uint8))
    ids = text(rng, 5) + image_tokens(1, config.image_seq_len) + text(rng, 3)
    answer = list(conversation.stream(ids, images, max_new_tokens=NEW))
    ids = ids + as_text(answer) + text(rng, 21)
    list(conversation.stream(ids, images, max_new_tokens=1))  # the state after the conversation itself
    pixels = pad_images([images])
    expected = jax.jit(lambda p: prefill(model, p, np.asarray([ids]), np.ones((1, len(ids))), pixels["pixel_values"],
                                         pixels["pixel_attention_mask"], max_columns=len(ids) + 1).logits)(params)
    assert rel_err(conversation.state.logits, expected) < 1e-5


def test_cut_inside_an_image_and_early_stop(converted, seed):
    rng = np.random.default_rng([seed, 702])
    config, params = converted
    latents = config.image_seq_len
    conversation = Conversation(Generator(Idefics2(config), params), image_token_id=IMAGE_TOKEN_ID,
                                image_seq_len=latents)
    images = ImageProcessor(longest_edge=48, shortest_edge=16).process_image(
        rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8))
    ids = text(rng, 4) + image_tokens(1, latents) + text(rng, 2)
    steps = conversation.stream(ids, images, max_new_tokens=NEW)
    first, second = next(steps), next(steps)
    steps.close()  # the caller stops early: the cache holds the conversation and the first token
    assert conversation.cached_tokens == len(ids) + 1 and conversation.tokens[-1] == first
    start = ids.index(IMAGE_TOKEN_ID)
    # the last token always runs, so a conversation ending inside the image shares nothing of it
    assert conversation.shared_prefix(ids[:start + latents // 2]) == start
    assert conversation.shared_prefix(ids[:start + latents + 2]) == start + latents + 1
    # a token that went in as text does not stand for an image token
    conversation.tokens[start], conversation.as_image[start] = IMAGE_TOKEN_ID, False
    assert conversation.shared_prefix(ids) == start
    assert second == fresh(conversation.generator, ids, images)[1]
    # the same conversation again (a regenerated answer): the cache is cut back to its last token
    conversation.as_image[start] = True
    again = list(conversation.stream(ids, images, max_new_tokens=NEW))
    assert again == fresh(conversation.generator, ids, images) and conversation.reused == len(ids) - 1
