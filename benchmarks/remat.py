"""Rematerialisation policies: what each costs in memory and in step time.

    python benchmarks/remat.py [--configs 80M,8b] [--steps 5] [--out benchmarks/RESULTS.md]

For every policy of `idefics_jax/models/remat.py`, the training step (`make_train_step`'s program,
as training runs it: forward, backward, AdamW, the old state donated) is compiled for one device and
XLA's buffer assignment is read (`compiled.memory_analysis()`): `temp` is what the step allocates
besides its inputs and outputs (activations kept for the backward pass, gradients, workspace),
`host` what offloaded policies keep in host memory, `total` the step's peak on the device (inputs,
plus outputs not written over the donated state, plus temp). Configs:

* `80M` (benchmarks/train_step.py's, float32, 2 rows of 512 tokens with one 378 px image each):
  compiled and run; the median step time after 2 warm-up steps.
* `8b` (Idefics2-8B, layers scanned, bfloat16 compute over float32 parameters, one row of 2048
  tokens with stage 1's 24 image slots at 384 px): compiled only, from abstract shapes (nothing is
  allocated). A step's gradients alone are 32 GB here (one device): compare the policies' differences,
  which are the activations; on a mesh the gradients are split over fsdp, the activations over data
  and fsdp (per row).

XLA:CPU's buffer assignment is not a TPU's or GPU's, but what the policies keep is the same.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

GB = 1e9


def eighty_m_inputs(rng):
    """The 80M config (random weights) and one batch: (config, params, batch)."""
    from train_step import CONFIGS, make_batch, save_random_model, train_batch

    from idefics_jax import load_hf_checkpoint

    spec = CONFIGS["80M"]
    hf_dir, _ = save_random_model("80M")
    config, params = load_hf_checkpoint(hf_dir, on_device=False)
    ids, pixels, mask, labels = make_batch(spec, rng)
    return config, params, train_batch(ids, pixels, mask, labels)


def eight_b_batch(config, seq=2048, images=24, side=384) -> dict:
    """Abstract stage-1 row: `images` images of 64 latents among `seq` tokens."""
    import jax

    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    return {"input_ids": spec((1, seq), np.int32), "segment_ids": spec((1, seq), np.int32),
            "positions": spec((1, seq), np.int32), "targets": spec((1, seq), np.int32),
            "loss_mask": spec((1, seq), bool), "pixel_values": spec((1, images, side, side, 3), np.float32),
            "pixel_attention_mask": spec((1, images, side, side), bool)}


def measure(config, policy: str, batch, params=None, steps: int = 0, scan: bool = False, dtype="float32") -> dict:
    """Compiles the step with `policy` (abstract state when `params` is None) and runs it `steps` times."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from idefics_jax import Idefics2
    from idefics_jax.sharding import make_mesh
    from idefics_jax.train.data import global_batch
    from idefics_jax.train.optimizer import make_optimizer
    from idefics_jax.train.step import abstract_state, init_state, make_train_step

    model = Idefics2(config, remat=policy, scan_layers=scan, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    tx, _ = make_optimizer(learning_rate=1e-4, warmup_steps=1, total_steps=100, weight_decay=0.01, grad_clip=1.0)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    if params is None:
        state = nn.meta.unbox(abstract_state(model, tx, jax.random.PRNGKey(0))[1])
    else:
        state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
        state = state.replace(params=jax.tree.map(lambda p, s: jax.device_put(p, s.sharding), params, state.params))
        batch = global_batch(batch, mesh)
    step = make_train_step(model, tx, mesh)  # as training runs it: the state donated, laid out by the rules
    start = time.perf_counter()
    compiled = step.compile(state, batch)
    memory = compiled.memory_analysis()
    # the step's peak on the device: inputs, outputs not written over donated inputs, temporaries
    held = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    result = {"compile": time.perf_counter() - start, "temp": memory.temp_size_in_bytes,
              "host": getattr(memory, "host_temp_size_in_bytes", 0), "total": held + memory.temp_size_in_bytes}
    if steps:
        from train_step import median_step_time

        result["step"], result["loss"] = median_step_time(step, state, batch, steps)  # the program compiled above
    return result


def main():
    from preprocess import append_results, machine

    from idefics_jax.config import Idefics2Config
    from idefics_jax.models.remat import POLICIES

    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="80M,8b")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    lines = [f"\n## Rematerialisation policies ({datetime.date.today()})\n", f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/remat.py --configs {args.configs} --steps {args.steps}` (XLA:CPU's buffer "
             "assignment of the whole training step on one device; 8b compiled from abstract shapes, not run).\n",
             "| config | policy | temp (GB) | temp - full's (GB) | total (GB) | host (GB) | compile (s) | step (s) | loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        if name == "80M":
            config, params, batch = eighty_m_inputs(np.random.default_rng(0))
            run = lambda policy: measure(config, policy, batch, params, steps=args.steps)
        elif name == "8b":
            config = Idefics2Config.preset("idefics2-8b")
            run = lambda policy: measure(config, policy, eight_b_batch(config), scan=True, dtype="bfloat16")
        else:
            raise SystemExit(f"--configs: unknown config {name!r} (80M, 8b)")
        results = {policy: run(policy) for policy in args.policies.split(",")}
        full = results.get("full", {}).get("temp")
        for policy, r in results.items():
            extra = f"{(r['temp'] - full) / GB:+.2f}" if full is not None else ""
            step = f"{r['step']:.3f}" if "step" in r else ""
            loss = f"{r['loss']:.4f}" if "loss" in r else ""
            lines.append(f"| {name} | {policy} | {r['temp'] / GB:.2f} | {extra} | {r['total'] / GB:.2f} | {r['host'] / GB:.2f} | "
                         f"{r['compile']:.0f} | {step} | {loss} |")
            print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
