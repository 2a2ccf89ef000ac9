"""Continuous batching: requests that join a running decode loop at different steps, with different
settings, each get the tokens `Generator.generate` gives them alone."""

from __future__ import annotations

import numpy as np
import pytest

from idefics_jax import Idefics2
from idefics_jax.inference.batcher import Batcher, Request
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import GREEDY, Sampling
from helpers.inputs import make_batch


def request(rng, rows, n_latents, width: int, image_side: int = 56):
    """One request, left padded to `[1, width]`, its images zero padded to `image_side` (few shapes:
    few compiled programs)."""
    ids, mask, pixels, pixel_mask = make_batch(rng, rows, n_latents)
    ids, mask = (np.pad(x, ((0, 0), (width - x.shape[1], 0))) for x in (ids, mask))
    if not rows[0][1]:
        return ids, mask, None, None
    grow = ((0, 0), (0, 0), (0, image_side - pixels.shape[2]), (0, image_side - pixels.shape[3]))
    return ids, mask, np.pad(pixels, grow + ((0, 0),)), np.pad(pixel_mask, grow)


def serve(batcher, requests, joins):
    """Runs `requests` [(inputs, max_new_tokens, sampling, seed)] through `batcher`: request i joins
    before step `joins[i]` (or later, when no row is free); returns each one's tokens."""
    waiting, running, done = list(range(len(requests))), {}, {}
    while waiting or running:
        while waiting and joins[waiting[0]] <= batcher.steps and batcher.free:
            i = waiting.pop(0)
            inputs, new, sampling, seed = requests[i]
            running[batcher.admit(*inputs, max_new_tokens=new, sampling=sampling, seed=seed)] = (i, [])
        tokens = batcher.step()
        for row, (i, out) in list(running.items()):
            out.append(int(tokens[row]))
            if len(out) == requests[i][1]:
                done[i] = out
                batcher.release(row)
                del running[row]
    return [done[i] for i in range(len(requests))]


def alone(generator, inputs, new, sampling, seed):
    """`Generator.generate`'s tokens (streamed: equal, and compiled once for every `new`)."""
    return [int(t[0]) for t in generator.stream(*inputs, max_new_tokens=new, sampling=sampling, seed=seed)]


def test_requests_joining_a_running_batch_answer_as_each_alone(converted, seed):
    """The tiny model's window is 16 columns: the cache is a 16-slot ring that every prompt overflows."""
    rng = np.random.default_rng([seed, 900])
    config, params = converted
    n = config.image_seq_len
    generator = Generator(Idefics2(config), params)
    requests = [  # (inputs, max_new_tokens, sampling, seed)
        (request(rng, [([5, 7], [(40, 56)])], n, 48), 10, GREEDY, 0),
        (request(rng, [([20], [])], n, 48), 12, Sampling(temperature=0.9, top_k=20), 5),
        (request(rng, [([3, 4, 5], [(56, 36), (24, 48)])], n, 48), 7, Sampling(repetition_penalty=1.5), 0),
        (request(rng, [([9], [])], n, 48), 6, Sampling(temperature=1.2, top_p=0.8, min_p=0.05), 11),
        (request(rng, [([2, 3], [(30, 45)])], n, 48), 9, Sampling(temperature=1.2, top_p=0.8, min_p=0.05), 2),
    ]
    batcher = Batcher(generator, rows=3)
    assert batcher.length == config.text.sliding_window and batcher.wraps
    got = serve(batcher, requests, joins=[0, 2, 2, 3, 4])  # the last two wait for free rows
    for i, (tokens, (inputs, new, sampling, s)) in enumerate(zip(got, requests)):
        assert tokens == alone(generator, inputs, new, sampling, s), f"request {i} ({sampling})"
    with pytest.raises(ValueError, match="left padded"):
        batcher.admit(np.ones((1, 4), np.int32), np.array([[1, 1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="context of 512 tokens"):
        batcher.admit(*requests[1][0], max_new_tokens=500)
    assert batcher.free == 3  # refused requests take no row


def test_rows_reused_round_the_ring_without_a_window(converted, seed):
    """Without a window the cache holds `max_columns` columns per row; requests longer than that are
    refused, and rows are reused while the shared column index goes round the ring several times."""
    rng = np.random.default_rng([seed, 901])
    config, params = converted
    config = config.replace(text=config.text.replace(sliding_window=None))
    generator = Generator(Idefics2(config), params)
    batcher = Batcher(generator, rows=2, max_columns=32)
    assert batcher.length == 32 and not batcher.wraps
    # prompts of 4-12 tokens padded to 48 columns (more than the cache: the row takes their last 32)
    prompts = [request(rng, [([int(k)], [])], config.image_seq_len, 48) for k in rng.integers(4, 13, 8)]
    requests = [(p, int(new), Sampling(temperature=1.0) if i % 2 else GREEDY, i)
                for i, (p, new) in enumerate(zip(prompts, rng.integers(10, 21, 8)))]
    got = batcher.generate_all([Request(*r) for r in requests])  # each joins when a row is free
    assert batcher.steps > 32 and int(batcher.state.state.cache.index) == batcher.steps % 32  # it went round
    for i, (tokens, (inputs, new, sampling, s)) in enumerate(zip(got, requests)):
        assert tokens == alone(generator, inputs, new, sampling, s), f"request {i} ({sampling})"
    # three tokens per device call: requests end inside a call (their later tokens dropped) and join
    # between calls, each still answered as alone
    assert Batcher(generator, rows=2, max_columns=32).generate_all([Request(*r) for r in requests], chunk=3) == got
    # a stop token ends a request early: it is kept, the row taken by the next one (the programs above serve)
    stop = got[0][2]
    stopping = Generator(generator.model, params, stop_ids=(stop,))
    ended = Batcher(stopping, rows=2, max_columns=32).generate_all([Request(*r) for r in requests[:4]], chunk=3)
    assert ended[0] == got[0][:got[0].index(stop) + 1]
    for i, (tokens, (inputs, new, sampling, s)) in enumerate(zip(ended, requests)):
        assert tokens == alone(stopping, inputs, new, sampling, s), f"request {i} ({sampling}), stop {stop}"
    with pytest.raises(ValueError, match="35 is more than the 32 columns each request may take here"):
        batcher.admit(*request(rng, [([20], [])], config.image_seq_len, 48), max_new_tokens=15)
