"""Decode speed of the Idefics2-8B decoder (Mistral-7B shape) at batch 1, against the HBM bound.

    python benchmarks/decode_gpu.py [--prompt 32] [--new 256] [--quantize int8] [--out benchmarks/RESULTS.md]

For a GPU (or TPU). The model is Idefics2's default config (Mistral-7B decoder, 32 layers, 4096
wide, GQA 32/8, window 4096) with random bfloat16 weights; a text-only prompt, so the vision
tower and the Perceiver never run (their weights exist but are not counted as read). Greedy `Generator.generate`: one `lax.while_loop`.

Bound: every decode step reads all decoder and LM-head weights once plus the KV cache; at the
measured copy bandwidth (a jitted `x * 1` over 4 GiB, read + write counted) that is the fastest a
step can be. Reported: tokens/s, the bound's tokens/s and their ratio (target 80%). With `--quantize
int8` the projections are int8 with float32 per-channel scales (`models/quantize.py`): the bound
counts those bytes, about half of bfloat16's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timed  # noqa: E402
from preprocess import append_results  # noqa: E402

from idefics_jax import Idefics2, Idefics2Config  # noqa: E402
from idefics_jax.inference.generate import Generator  # noqa: E402
from idefics_jax.inference.sampling import GREEDY, row_keys  # noqa: E402
from idefics_jax.models.quantize import quantize_params  # noqa: E402
from idefics_jax.train import profile_summary  # noqa: E402


def copy_bandwidth(gib: int = 4, repeats: int = 10) -> float:
    x = jnp.ones((gib * 2**29,), jnp.bfloat16)
    return 2 * x.nbytes / timed(jax.jit(lambda x: x * 1), x, repeats=repeats)


def random_params(model, ids):
    """bfloat16 normal(0, 0.02) weights of the model, drawn on the device leaf by leaf."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"]))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, jnp.bfloat16), static_argnums=1)
    return jax.tree.unflatten(tree, [draw(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="fewer decoder layers: a smoke run on CPU")
    parser.add_argument("--quantize", choices=("int8",), default=None, help="int8 weights for every projection")
    parser.add_argument("--profile", help="also trace one generation into this directory and print its device "
                        "time per op class (idefics_jax.train.profile_summary)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    config = Idefics2Config()
    config = config.replace(text=config.text.replace(num_hidden_layers=args.layers))
    model = Idefics2(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, (1, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    params = random_params(model, ids)
    if args.quantize:
        params = quantize_params(params, args.quantize)
    # what a step reads: the decoder (one embedding row of it) and the LM head; the vision tower and
    # the connector exist in the tree but a text-only prompt never touches them
    read = {"text_model": params["model"]["text_model"], "lm_head": params["lm_head"]}
    count = sum(x.size for x in jax.tree.leaves(read))
    embed = params["model"]["text_model"]["embed_tokens"]["embedding"]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(read)) - embed.nbytes + embed.shape[1] * embed.dtype.itemsize
    generator = Generator(model, params)

    def run(n):
        start = time.perf_counter()
        out = generator.generate(ids, mask, max_new_tokens=n)
        return time.perf_counter() - start, out

    run(1), run(args.new)  # compile both
    first = statistics.median(run(1)[0] for _ in range(args.repeats))
    total = statistics.median(run(args.new)[0] for _ in range(args.repeats))
    step = (total - first) / (args.new - 1)
    t = config.text
    columns = min(t.sliding_window or 1 << 30, args.prompt + args.new)  # the cache's length
    cache_bytes = 2 * t.num_hidden_layers * columns * t.num_key_value_heads * t.attention_head_dim * 2
    bandwidth = copy_bandwidth()
    bound = (weight_bytes + cache_bytes) / bandwidth
    dev = jax.devices()[0]
    flags = f"XLA_FLAGS='{os.environ['XLA_FLAGS']}' " if os.environ.get("XLA_FLAGS") else ""
    weights = "int8 (per-channel scales)" if args.quantize else "bfloat16"
    lines = [f"\n## Decode, Idefics2-8B decoder, batch 1, {weights} weights ({datetime.date.today()})\n",
             f"Machine: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}.\n",
             f"Command: `{flags}python benchmarks/decode_gpu.py --prompt {args.prompt} --new {args.new} --layers {args.layers}"
             f"{' --quantize ' + args.quantize if args.quantize else ''}` (random bfloat16 "
             f"weights, {args.layers} layers, {count / 1e9:.2f}B decoder + LM-head parameters, greedy, text-only prompt; "
             f"step time = (time for {args.new} tokens - time for 1) / {args.new - 1}; medians of "
             f"{args.repeats}).\n",
             "| first token (ms) | decode step (ms) | tokens/s | bytes read per step (GB) | copy bandwidth (TB/s) "
             "| bound (tokens/s) | fraction of bound |", "|---|---|---|---|---|---|---|",
             f"| {first * 1e3:.1f} | {step * 1e3:.2f} | {1 / step:.1f} | {(weight_bytes + cache_bytes) / 1e9:.2f} "
             f"| {bandwidth / 1e12:.2f} | {1 / bound:.1f} | {bound / step:.0%} |"]
    print("\n".join(lines), flush=True)
    append_results(args.out, lines)
    if args.profile:
        print(profile(generator, ids, mask, args.new, args.profile), flush=True)


def profile(generator, ids, mask, new: int, directory: str) -> str:
    """One traced generation of `new` tokens, read per op class (the generate program's compiled text
    saved beside the trace)."""
    jax.profiler.start_trace(directory)
    generator.generate(ids, mask, max_new_tokens=new)
    jax.profiler.stop_trace()
    inputs = generator.place((ids, mask, None, None))
    with generator.on_mesh():
        text = generator.generate_program.lower(
            generator.params, inputs, row_keys(0, len(ids)), max_new_tokens=new,
            max_columns=generator.check(ids, mask, None, new), sampling=GREEDY, stop_ids=generator.stop_ids,
            pad_id=generator.pad_id).compile().as_text()
    (Path(directory) / profile_summary.HLO_FILE).write_text(text)
    summary = profile_summary.summarize(profile_summary.latest_trace(Path(directory)),
                                        {profile_summary.module_name(text): text})
    return f"Device time of one generation of {new} tokens, per op class:\n\n" + profile_summary.table(summary)


if __name__ == "__main__":
    main()
