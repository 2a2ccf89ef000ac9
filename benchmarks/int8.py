"""int8 weights against the float model they come from, on the same inputs: the logits' error, the
share of greedy choices kept, and the parameters' bytes (`idefics_jax/models/quantize.py`).

    python benchmarks/int8.py [--seeds 3] [--out benchmarks/RESULTS.md]

Random weights (the tiny preset at 112 px and the ~80M config of `train_step.py`), float32 compute,
one image and 100 text tokens a row, 2 rows. Speed is the GPU's question (`decode_gpu.py --quantize int8`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import append_results  # noqa: E402

from idefics_jax import Idefics2, Idefics2Config  # noqa: E402
from idefics_jax.config import PerceiverConfig, TextConfig, VisionConfig  # noqa: E402
from idefics_jax.models.quantize import param_bytes, quantize_params  # noqa: E402

CONFIGS = {
    "tiny": Idefics2Config.preset("tiny").replace(vision=Idefics2Config.preset("tiny").vision.replace(image_size=112)),
    "80M": Idefics2Config(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                            image_size=378, patch_size=14),
        perceiver=PerceiverConfig(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=8,
                                  resampler_head_dim=64, num_key_value_heads=4),
        text=TextConfig(vocab_size=32003, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, sliding_window=4096),
        image_token_id=32001),
}


def cpu_name() -> str:
    """The CPU's model name and core count (from /proc/cpuinfo where there is one)."""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {model}"


def measure(config: Idefics2Config, seed: int) -> tuple[float, float, float]:
    """(largest logit error / largest logit, share of equal argmaxes, int8 bytes / float32 bytes)."""
    model = Idefics2(config)
    rng = np.random.default_rng(seed)
    side = config.vision.image_size
    ids = np.concatenate([rng.integers(3, 1000, 10), [config.image_token_id] * config.image_seq_len,
                          rng.integers(3, 1000, 100)])[None].repeat(2, 0)
    pixels = rng.uniform(-1, 1, (2, 1, side, side, 3)).astype(np.float32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    quantized = quantize_params(params)
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, pixel_values=pixels))
    ref, ours = np.asarray(forward(params)), np.asarray(forward(quantized))
    return (float(np.abs(ours - ref).max() / np.abs(ref).max()), float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            param_bytes(quantized) / param_bytes(params))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    lines = [f"\n## int8 weights against float32, random models (CPU, {datetime.date.today()})\n",
             f"Machine: {cpu_name()}, jax {jax.__version__}.\n",
             f"Command: `python benchmarks/int8.py --seeds {args.seeds}` (per-channel int8 projections against "
             f"the float32 model on the same inputs; min-max over seeds).\n",
             "| model | largest logit error / largest logit | greedy choices kept | bytes vs float32 |",
             "|---|---|---|---|"]
    for name, config in CONFIGS.items():
        runs = np.array([measure(config, seed) for seed in range(args.seeds)])
        lo, hi = runs.min(axis=0), runs.max(axis=0)
        lines.append(f"| {name} | {lo[0]:.1%} - {hi[0]:.1%} | {lo[1]:.0%} - {hi[1]:.0%} | {hi[2]:.0%} |")
        print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
