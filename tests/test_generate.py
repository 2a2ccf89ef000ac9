"""Cached generation: equal to transformers' `generate`, and to full forward passes step by step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import IMAGE_TOKEN_ID, rel_err, xla_flags
from idefics_jax import Idefics2
from idefics_jax.inference import sampling as sampling_module
from idefics_jax.data.image_processing import ImageProcessor, pad_images
from idefics_jax.inference.engine import decode, prefill
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import (RowSampling, Sampling, next_token, next_token_rows, process_logits,
                                          process_logits_rows, row_keys, seen_tokens, token_keys)
from helpers.generation import NEW, assert_same_greedy_tokens, hf_generate
from helpers.inputs import make_batch



def split_batch(rng, n_latents, sizes):
    """One prompt per image size, each image split into 4 crops + the whole (5 x latents tokens)."""
    processor = ImageProcessor(longest_edge=48, shortest_edge=16, do_image_splitting=True)
    rows, ids = [], []
    for h, w in sizes:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        rows.append(processor.process_image(image))
        row = rng.integers(3, IMAGE_TOKEN_ID, size=3).tolist()
        for _ in range(5):  # <fake><image>*latents, with a plain token standing for <fake>
            row += [7] + [IMAGE_TOKEN_ID] * n_latents
        ids.append(row + [7] + rng.integers(3, IMAGE_TOKEN_ID, size=4).tolist())
    seq = max(len(r) for r in ids)
    input_ids = np.zeros((len(ids), seq), np.int64)
    mask = np.zeros((len(ids), seq), np.int64)
    for b, row in enumerate(ids):
        input_ids[b, seq - len(row):], mask[b, seq - len(row):] = row, 1
    images = pad_images(rows)
    return input_ids, mask, images["pixel_values"], images["pixel_attention_mask"]


CASES = {
    "text_only": [([11], [])],
    "one_image": [([4, 3], [(40, 36)])],
    "two_images": [([3, 5, 2], [(28, 52), (44, 20)])],
    "batch_of_lengths": [([4, 3], [(40, 36)]), ([9, 15], [(28, 52)]), ([2], [])],
}


def test_only_near_ties_excuse_a_different_greedy_token():
    scores = np.zeros((2, 3, 5), np.float32)
    scores[:, :, 1] = 10.0
    scores[0, 1, 3] = 10.0 - 1e-5  # row 0, step 1: a near tie between tokens 1 and 3
    expected = np.ones((2, 3), np.int64)
    assert_same_greedy_tokens(np.array([[1, 3, 4], [1, 1, 1]]), expected, scores)  # diverged after the tie
    for ours in ([[1, 1, 1], [1, 3, 1]], [[1, 2, 1], [1, 1, 1]], [[3, 1, 1], [1, 1, 1]]):  # no tie there
        with pytest.raises(AssertionError, match="differs at new token"):
            assert_same_greedy_tokens(np.array(ours), expected, scores)


@pytest.mark.parametrize("case", [*CASES, "split"])
def test_greedy_equals_transformers_generate(hf_dir, converted, seed, case):
    rng = np.random.default_rng([seed, 400, len(case)])
    config, params = converted
    if case == "split":
        input_ids, mask, pixels, pixel_mask = split_batch(rng, config.image_seq_len, [(30, 45), (41, 17)])
    else:
        input_ids, mask, pixels, pixel_mask = make_batch(rng, CASES[case], config.image_seq_len)
        if case == "text_only":
            pixels = pixel_mask = None
        elif case == "batch_of_lengths":
            pixels[2] = 0  # the third row has no image
            pixel_mask[2] = False
    expected, scores = hf_generate(hf_dir[1], input_ids, mask, pixels, pixel_mask, scores=True, eos_token_id=None)
    ours = Generator(Idefics2(config), params).generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=NEW)
    assert_same_greedy_tokens(ours, expected, scores)


def test_stop_tokens_pad_like_transformers(hf_dir, converted, seed):
    """A row stops at its first stop token and pads after it; the loop ends when all rows are done."""
    rng = np.random.default_rng([seed, 401])
    config, params = converted
    input_ids, mask, pixels, pixel_mask = make_batch(rng, CASES["batch_of_lengths"], config.image_seq_len)
    pixels[2], pixel_mask[2] = 0, False
    free = Generator(Idefics2(config), params).generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=NEW)
    stop = int(free[0, 5])  # a token row 0 produces: it must stop there
    pad = 1 if stop != 1 else 2
    ours = Generator(Idefics2(config), params, stop_ids=[stop], pad_id=pad).generate(
        input_ids, mask, pixels, pixel_mask, max_new_tokens=NEW)
    expected = hf_generate(hf_dir[1], input_ids, mask, pixels, pixel_mask, eos_token_id=stop, pad_token_id=pad)
    width = expected.shape[1]  # transformers ends early when every row is done
    np.testing.assert_array_equal(ours[:, :width], expected)
    assert (ours[:, width:] == pad).all()
    first = int(np.argmax(free[0] == stop))
    assert (ours[0, first + 1:] == pad).all() and ours[0, first] == stop


def test_cached_decoding_equals_full_forward(converted, seed):
    """Teacher-forced decoding past the sliding window (16): every step's logits equal the full pass's."""
    rng = np.random.default_rng([seed, 402])
    config, params = converted
    window = config.text.sliding_window
    input_ids, mask, pixels, pixel_mask = make_batch(rng, [([5, 2], [(40, 36)]), ([3], [])], config.image_seq_len)
    pixels[1], pixel_mask[1] = 0, False
    forced = rng.integers(3, IMAGE_TOKEN_ID, size=(2, 2 * window + 3))
    full_ids = np.concatenate([input_ids, forced], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(forced)], axis=1)
    model = Idefics2(config)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(jax.jit(lambda p: model.apply({"params": p}, full_ids, attention_mask=full_mask,
                                                     positions=positions, pixel_values=pixels,
                                                     pixel_attention_mask=pixel_mask))(params))
    prompt = input_ids.shape[1]
    state = jax.jit(lambda p: prefill(model, p, input_ids, mask, pixels, pixel_mask,
                                      max_columns=full_ids.shape[1]))(params)
    assert state.cache.length == window
    step = jax.jit(lambda p, s, t: decode(model, p, s, t))
    for t in range(forced.shape[1]):
        assert rel_err(state.logits, full[:, prompt + t - 1]) < 1e-5, t
        state = step(params, state, forced[:, t])
    assert rel_err(state.logits, full[:, -1]) < 1e-5


def test_chunks_into_a_filled_cache_equal_full_forward(converted, seed):
    """Several columns at a time into a cache that already holds columns (attention over [cache; chunk],
    then the write), chunks that wrap the ring buffer included: logits equal the full pass's."""
    rng = np.random.default_rng([seed, 407])
    config, params = converted
    window = config.text.sliding_window
    input_ids, mask, pixels, pixel_mask = make_batch(rng, [([5, 2], [(40, 36)]), ([3], [])], config.image_seq_len)
    pixels[1], pixel_mask[1] = 0, False
    chunks = [5, 1, 7, window - 2, 13]
    forced = rng.integers(3, IMAGE_TOKEN_ID, size=(2, sum(chunks)))
    full_ids = np.concatenate([input_ids, forced], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(forced)], axis=1)
    model = Idefics2(config)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(model.apply({"params": params}, full_ids, attention_mask=full_mask, positions=positions,
                                  pixel_values=pixels, pixel_attention_mask=pixel_mask))
    prompt = input_ids.shape[1]
    state = prefill(model, params, input_ids, mask, pixels, pixel_mask, max_columns=full_ids.shape[1])
    assert state.cache.length == window and not state.cache.fresh
    step = jax.jit(lambda params, ids, positions, cache: model.apply(
        {"params": params}, ids, attention_mask=jnp.ones(ids.shape, jnp.int32), positions=positions, cache=cache))
    cache, start = state.cache, 0
    for size in chunks:
        cols = slice(prompt + start, prompt + start + size)
        logits, cache = step(params, forced[:, start:start + size], positions[:, cols], cache)
        assert rel_err(logits, full[:, cols]) < 1e-5, (start, size)
        start += size


def test_stream_equals_generate(converted, seed):
    rng = np.random.default_rng([seed, 403])
    config, params = converted
    input_ids, mask, pixels, pixel_mask = make_batch(rng, CASES["one_image"] * 2, config.image_seq_len)
    generator = Generator(Idefics2(config), params)
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    whole = generator.generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=12, sampling=sampling, seed=3)
    streamed = np.stack(list(generator.stream(input_ids, mask, pixels, pixel_mask, max_new_tokens=12,
                                              sampling=sampling, seed=3)), axis=1)
    np.testing.assert_array_equal(streamed, whole)
    # a Generator made again for the same model (new parameters) runs the programs already compiled
    compiled = generator.generate_program._cache_size()
    other = Generator(Idefics2(config), jax.tree.map(jnp.copy, params))
    again = other.generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=12, sampling=sampling, seed=3)
    np.testing.assert_array_equal(again, whole)
    assert other.generate_program is generator.generate_program and other.generate_program._cache_size() == compiled


FILTER_CASES = [(1.0, 5, 1.0, 1.0, 0.0), (0.7, 0, 0.8, 1.0, 0.0), (1.3, 10, 0.5, 1.0, 0.0), (1.0, 0, 0.05, 1.0, 0.0),
                (0.0, 0, 1.0, 1.4, 0.0), (0.8, 7, 0.9, 0.7, 0.0), (1.0, 0, 1.0, 1.0, 0.1), (1.5, 20, 0.95, 1.2, 0.05),
                (2.0, 200, 0.99, 1.0, 0.0)]  # flat: its k and nucleus pass the middle tier at 8 candidates


@pytest.fixture(params=[8, 256], ids=lambda n: f"{n}_candidates")
def candidates(request, monkeypatch):
    """The top-k / top-p filters' first look (`sampling.CANDIDATES`, 256): at 8 of the tests' 300
    tokens the tiers are 8, 128 and 300, and the rows' k and nuclei fall in each of them."""
    monkeypatch.setattr(sampling_module, "CANDIDATES", request.param)
    return request.param


@pytest.mark.parametrize("temperature,top_k,top_p,penalty,min_p", FILTER_CASES)
def test_logit_filters_equal_transformers(seed, candidates, temperature, top_k, top_p, penalty, min_p):
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng([seed, 404])
    logits = rng.normal(size=(4, 300)).astype(np.float32) * 3
    tokens = rng.integers(0, 300, size=(4, 40))
    processors = LogitsProcessorList(([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1 else []) +
                                     ([TemperatureLogitsWarper(temperature)] if temperature else []) +
                                     ([TopKLogitsWarper(top_k)] if top_k else []) +
                                     ([TopPLogitsWarper(top_p)] if top_p < 1 else []) +
                                     ([MinPLogitsWarper(min_p)] if min_p else []))
    expected = processors(torch.tensor(tokens), torch.tensor(logits)).numpy()
    seen = seen_tokens(tokens, np.ones_like(tokens), logits.shape[1])
    ours = np.asarray(process_logits(logits, Sampling(temperature, top_k, top_p, penalty, min_p), seen))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_row_settings_choose_as_each_row_alone(seed, candidates):
    """A batch whose rows sample differently (continuous batching) processes and draws each row as a
    batch of that row alone with its settings: the same logits bit for bit, the same draws. With 8
    candidates the batch's top-k and top-p take the whole vocabulary, the rows alone all three tiers."""
    rng = np.random.default_rng([seed, 407])
    settings = [Sampling(*row) for row in FILTER_CASES] + [Sampling(top_k=3), Sampling(0.9, 0, 1.0, 1.0, 0.3)]
    logits = rng.normal(size=(len(settings), 300)).astype(np.float32) * 3
    seen = np.asarray(seen_tokens(rng.integers(0, 300, size=(len(settings), 40)), np.ones((len(settings), 40)), 300))
    rows = RowSampling.of(settings)
    together = np.asarray(process_logits_rows(logits, rows, seen))
    keys = token_keys(jnp.concatenate([row_keys(int(s), 1) for s in rng.integers(0, 1 << 30, len(settings))]), 5)
    drawn = np.asarray(next_token_rows(logits, rows, keys, seen))
    for i, sampling in enumerate(settings):
        alone = np.asarray(process_logits(logits[i:i + 1], sampling, seen[i:i + 1]))[0]
        np.testing.assert_array_equal(together[i], alone, err_msg=str(sampling))
        assert drawn[i] == next_token(logits[i:i + 1], sampling, keys[i:i + 1], seen[i:i + 1])[0], sampling


@pytest.mark.parametrize("case", ["text_only", "one_image"])
def test_repetition_penalty_equals_transformers_generate(hf_dir, converted, seed, case):
    """Greedy with a repetition penalty; also on a 2-row batch with the prompt's tokens in both rows."""
    rng = np.random.default_rng([seed, 406, len(case)])
    config, params = converted
    rows = CASES[case] * 2
    input_ids, mask, pixels, pixel_mask = make_batch(rng, rows, config.image_seq_len)
    if case == "text_only":
        pixels = pixel_mask = None
    generator = Generator(Idefics2(config), params)
    for penalty in (1.8, 0.6):
        expected, scores = hf_generate(hf_dir[1], input_ids, mask, pixels, pixel_mask, scores=True,
                                       eos_token_id=None, repetition_penalty=penalty)
        ours = generator.generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=NEW,
                                  sampling=Sampling(repetition_penalty=penalty))
        assert_same_greedy_tokens(ours, expected, scores)
        streamed = np.stack(list(generator.stream(input_ids, mask, pixels, pixel_mask, max_new_tokens=NEW,
                                                  sampling=Sampling(repetition_penalty=penalty))), axis=1)
        np.testing.assert_array_equal(streamed, ours)


def test_sampled_tokens_stay_in_top_k(converted, seed):
    rng = np.random.default_rng([seed, 405])
    config, params = converted
    input_ids, mask, _, _ = make_batch(rng, [([9], [])] * 4, config.image_seq_len)
    model = Idefics2(config)
    state = prefill(model, params, input_ids, mask, max_columns=input_ids.shape[1] + 1)
    top3 = np.argsort(np.asarray(state.logits), axis=-1)[:, -3:]
    generator = Generator(model, params)
    for sample_seed in range(5):
        first = generator.generate(input_ids, mask, max_new_tokens=1, sampling=Sampling(1.0, top_k=3),
                                   seed=sample_seed)[:, 0]
        assert all(token in row for token, row in zip(first, top3))


def test_bad_requests_are_named(converted, seed):
    rng = np.random.default_rng([seed, 406])
    config, params = converted
    generator = Generator(Idefics2(config), params)
    input_ids, mask, pixels, pixel_mask = make_batch(rng, CASES["one_image"], config.image_seq_len)
    with pytest.raises(ValueError, match="context of 512 tokens"):
        generator.generate(input_ids, mask, pixels, pixel_mask, max_new_tokens=512)
    with pytest.raises(ValueError, match="image tokens"):  # two images, one image's worth of tokens
        generator.generate(input_ids, mask, np.concatenate([pixels, pixels], 1),
                           np.concatenate([pixel_mask, pixel_mask], 1), max_new_tokens=4)
    with pytest.raises(ValueError, match="no images were given"):
        generator.generate(input_ids, mask, max_new_tokens=4)
    right_padded = np.concatenate([input_ids, np.zeros((1, 2), input_ids.dtype)], 1)
    with pytest.raises(ValueError, match="left padded"):
        generator.generate(right_padded, np.concatenate([mask, np.zeros((1, 2), mask.dtype)], 1), max_new_tokens=4)


def test_generation_on_eight_simulated_devices(hf_dir, seed):
    """Greedy, sampled and streamed tokens, a chat conversation and continuous batching on (data,
    fsdp, tensor) meshes equal one device's; the parameters and the KV cache are sharded
    (tests/sharded_generate.py, in a fresh process)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR="")  # compiled afresh: the partitioner's warnings below
    script = Path(__file__).parent / "helpers" / "sharded_generate.py"
    result = subprocess.run([sys.executable, str(script), str(hf_dir[0]), str(seed)], env=env, capture_output=True,
                            text=True, timeout=900, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert result.stdout.count("equal: True") == 11 and "placed False" not in result.stdout, result.stdout
    assert result.stdout.count("kept True") == 2, result.stdout  # read into shards, not placed again
    assert "int8 checkpoint read into mesh (1, 2, 4) shards" in result.stdout, result.stdout
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-4000:]  # a replicated op
