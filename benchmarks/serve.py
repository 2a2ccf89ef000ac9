"""Serving throughput: continuous batching against static batches and one request at a time.

    python benchmarks/serve.py [--requests 16] [--rows 8] [--chunk 4] [--configs tiny,80M] [--out benchmarks/RESULTS.md]

`--requests` requests arrive together, each one image (64 visual tokens) and 32 text tokens, each
asking for its own number of new tokens (drawn from 8..64: answers differ in length, as a
server's do), greedy, float32, on this machine's CPU. Three ways to answer them all:

* one at a time: `Generator.generate` per request (batch 1);
* static batches: `--rows` requests at a time in one `Generator.generate` call, which runs until
  its longest request is done (rows that finished early wait);
* continuous: `Batcher.generate_all` with `--rows` rows: a request joins as soon as a row is free
  (as `python -m idefics_jax.serve` runs them), one token per device call, then `--chunk` tokens
  per call (`Batcher.advance`: fewer host round trips; requests join between calls).

Reported: the wall time to answer all of them and the useful new tokens per second (the tokens
asked for), compile time excluded (each way runs once before it is timed). All three give every
request the same tokens (checked and reported).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np


def one_at_a_time(generator, requests):
    return [generator.generate(*inputs, max_new_tokens=new)[0].tolist() for inputs, new in requests]


def static_batches(generator, requests, rows):
    out = []
    for start in range(0, len(requests), rows):
        group = requests[start:start + rows]
        inputs = [np.concatenate([r[0][k] for r in group]) for k in range(4)]
        new = generator.generate(*inputs, max_new_tokens=max(n for _, n in group))
        out += [row[:n].tolist() for row, (_, n) in zip(new, group)]
    return out


def continuous(batcher, requests, chunk=1):
    from idefics_jax.inference.batcher import Request

    return batcher.generate_all([Request(inputs, new) for inputs, new in requests], chunk=chunk)


def timed(fn):
    fn()  # compiles
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    from preprocess import add_malloc_option, append_results, apply_malloc, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4, help="tokens per device call in the chunked continuous run")
    parser.add_argument("--configs", default="tiny,80M")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    add_malloc_option(parser, "default")
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)

    from generate import prompt
    from train_step import CONFIGS, save_random_model

    from idefics_jax import Idefics2, load_hf_checkpoint
    from idefics_jax.inference.batcher import Batcher
    from idefics_jax.inference.generate import Generator

    lines = [f"\n## Serving: continuous batching ({args.requests} requests, {args.rows} rows) ({datetime.date.today()})\n",
             f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/serve.py --requests {args.requests} --rows {args.rows} --chunk {args.chunk} "
             f"{malloc}` (float32, "
             "greedy; each request one image + 32 text tokens and 8-64 new tokens; wall time to answer all, after "
             "a warm-up run of each way).\n",
             "| config | new tokens asked | one at a time (s) | tokens/s | static batches (s) | tokens/s | "
             f"continuous (s) | tokens/s | continuous, {args.chunk} per call (s) | tokens/s | continuous vs one at a "
             "time | vs static | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        rng = np.random.default_rng(0)
        requests = [(prompt(spec, rng), int(n)) for n in rng.integers(8, 65, args.requests)]
        config, params = load_hf_checkpoint(save_random_model(name)[0])
        generator = Generator(Idefics2(config), params)
        batcher = Batcher(generator, rows=args.rows, max_columns=requests[0][0][0].shape[1] + 64)
        t_one, one = timed(lambda: one_at_a_time(generator, requests))
        t_static, static = timed(lambda: static_batches(generator, requests, args.rows))
        t_cont, cont = timed(lambda: continuous(batcher, requests))
        t_chunk, chunked = timed(lambda: continuous(batcher, requests, args.chunk))
        asked = sum(n for _, n in requests)
        best = min(t_cont, t_chunk)
        lines.append(f"| {name} | {asked} | {t_one:.2f} | {asked / t_one:.0f} | {t_static:.2f} | {asked / t_static:.0f} "
                     f"| {t_cont:.2f} | {asked / t_cont:.0f} | {t_chunk:.2f} | {asked / t_chunk:.0f} | "
                     f"{t_one / best:.2f}x | {t_static / best:.2f}x | {one == static == cont == chunked} |")
        print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
