"""Generation speed: our cached generation against transformers' `generate` on the same converted
models and the same prompt, in one run, on this machine's CPU.

    python benchmarks/generate.py [--new 32] [--repeats 3] [--out benchmarks/RESULTS.md]

Configs as in `train_step.py` (tiny, ~80M; `--configs smolvlm-256m`: SmolVLM-256M's shape, the
image one 512 px tile). Prompt: one image (64 visual tokens) and 32 text tokens, batch 1, greedy,
float32. Time to first token is a `max_new_tokens=1` call (prefill: the
vision tower, the Perceiver and the prompt); decode speed is (new - 1) tokens over the rest of a
`max_new_tokens=new` call. Compile time is excluded (a warm-up call first); medians of the repeats.
Both produce the same tokens (checked and reported).

How far either could go on this machine: the matrix products of our first-token program (vision
tower, Perceiver, prompt, last position's logits) and of one decode step, read off their jaxprs,
each timed alone at its shape in jax and in torch, the faster counted (`train_step.matmul_floor`).
No implementation of the same model does less than those products, so "speed-up at the floor",
torch's time over that floor, is the most any could gain over torch. At batch 1 a decode step's
products are matrix-vector products, each weight read once: its floor times all of them in one
call, each with a matrix of its own (`distinct=True`), so the weights stream from memory. Being
independent there, they can run on all cores at once, which the layers of a real step, each
waiting for the one before, cannot: the decode floor is optimistic.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import numpy as np


def prompt(spec, rng):
    (h, w), image_id = spec["image"], spec["image_token_id"]
    ids = np.concatenate([rng.integers(3, image_id - 1, 16), [image_id] * 64, rng.integers(3, image_id - 1, 16)])
    pixels = rng.uniform(-1, 1, (1, 1, h, w, 3)).astype(np.float32)
    return ids[None].astype(np.int64), np.ones((1, len(ids)), np.int64), pixels, np.ones((1, 1, h, w), bool)


def median_time(fn, repeats):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def time_torch(hf_dir, spec, inputs, new, repeats):
    import torch

    from train_step import hf_classes

    model = hf_classes(spec)[1].from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    ids, mask, pixels, pixel_mask = inputs
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3),
                  pixel_attention_mask=torch.tensor(pixel_mask), do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=n)[0, ids.shape[1]:].numpy()

    first, _ = median_time(lambda: run(1), repeats)
    total, tokens = median_time(lambda: run(new), repeats)
    return first, total, tokens


def time_ours(hf_dir, inputs, new, repeats):
    from idefics_jax import Idefics2, load_hf_checkpoint
    from idefics_jax.inference.generate import Generator

    config, params = load_hf_checkpoint(hf_dir)
    generator = Generator(Idefics2(config), params)
    run = lambda n: generator.generate(*inputs, max_new_tokens=n)[0]
    first, _ = median_time(lambda: run(1), repeats)
    total, tokens = median_time(lambda: run(new), repeats)
    return first, total, tokens, product_shapes(generator, inputs, new)


def product_shapes(generator, inputs, new):
    """{(batch, m, k, n): count} of the matrix products of our first-token program and of one
    decode step (`train.flops.dot_shapes`), traced as `generate` runs them."""
    import jax.numpy as jnp

    from idefics_jax.inference.sampling import GREEDY, row_keys
    from idefics_jax.train.flops import dot_shapes

    settings = dict(sampling=GREEDY, stop_ids=generator.stop_ids, pad_id=generator.pad_id)
    max_columns = inputs[0].shape[1] + new
    keys = row_keys(0, inputs[0].shape[0])
    first = generator.first_program.trace(generator.params, inputs, keys, max_columns=max_columns, **settings)
    state, token, done = generator.first_program(generator.params, inputs, keys, max_columns=max_columns, **settings)
    step = generator.step_program.trace(generator.params, state, token, done, keys, jnp.int32(1), **settings)
    return dot_shapes(first.jaxpr.jaxpr), dot_shapes(step.jaxpr.jaxpr)


def main():
    from preprocess import add_malloc_option, append_results, apply_malloc, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="tiny,80M")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    add_malloc_option(parser, "default")  # as our command line does
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)  # before torch or XLA start their threads
    import torch

    from train_step import CONFIGS, matmul_floor, save_random_model

    torch.set_num_threads(os.cpu_count())  # both frameworks on every core (XLA:CPU takes them all)
    lines = [f"\n## Generation (batch 1, one image + 32 text tokens, {args.new} new tokens) ({datetime.date.today()})\n",
             f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), XLA:CPU on "
             f"{os.cpu_count()} cores.\n",
             f"Command: `python benchmarks/generate.py --configs {args.configs} --new {args.new} --repeats {args.repeats} {malloc}` (float32, greedy, "
             "same converted weights; median of the repeats after a warm-up call; theirs `generate` with SDPA "
             "attention, ours `Generator.generate`).\n",
             "| config | parameters | first token: transformers (ms) | ours (ms) | speed-up | floor (ms) | speed-up "
             "at the floor | decode: transformers (tokens/s) | ours (tokens/s) | speed-up | floor (tokens/s) | "
             "speed-up at the floor | same tokens |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        hf_dir, count = save_random_model(name)
        inputs = prompt(spec, rng)
        t_first, t_total, t_tokens = time_torch(hf_dir, spec, inputs, args.new, args.repeats)
        o_first, o_total, o_tokens, (first_shapes, step_shapes) = time_ours(hf_dir, inputs, args.new, args.repeats)
        t_rate, o_rate = (args.new - 1) / (t_total - t_first), (args.new - 1) / (o_total - o_first)
        first_floor, floor_rate = matmul_floor(first_shapes), 1 / matmul_floor(step_shapes, distinct=True)
        same = bool(np.array_equal(t_tokens, o_tokens))
        lines.append(f"| {name} | {count / 1e6:.1f}M | {t_first * 1e3:.1f} | {o_first * 1e3:.1f} | "
                     f"{t_first / o_first:.2f}x | {first_floor * 1e3:.1f} | {t_first / first_floor:.2f}x | "
                     f"{t_rate:.1f} | {o_rate:.1f} | {o_rate / t_rate:.2f}x | {floor_rate:.0f} | "
                     f"{floor_rate / t_rate:.2f}x | {same} |")
        print(lines[-1], f"({len(first_shapes)} / {len(step_shapes)} product shapes)", flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
