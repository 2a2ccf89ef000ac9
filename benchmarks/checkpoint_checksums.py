"""What checking a checkpoint's contents costs: saving, writing the checksums, verifying them and
restoring a training state (parameters and AdamW's moments) of the ~80M-parameter configuration.

    python benchmarks/checkpoint_checksums.py [--config 80M] [--repeats 3]

The state is the model's parameters (random, float32) and optax AdamW's state, saved by the
training run's `Checkpointer` (orbax, OCDBT) into a temporary directory; the checksums are the size
and CRC-32 of every file of the step (`checkpoints.train_state.seal`), verified before a restore
(`verify`). Each figure is the median of `--repeats` rounds. Appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import jax
import numpy as np
import optax
from etils import epath

sys.path.insert(0, str(Path(__file__).parent))

from idefics_jax.checkpoints import abstract_params  # noqa: E402
from idefics_jax.checkpoints.train_state import Checkpointer, seal, verify  # noqa: E402
from idefics_jax.config import Idefics2Config  # noqa: E402


def state_of(name: str, seed: int = 0) -> dict:
    from train_step import CONFIGS

    spec = CONFIGS[name]
    config = Idefics2Config.from_hf_dict({"model_type": "idefics2", **{k: v for k, v in spec.items()
                                                                      if k.endswith("config") or k == "image_token_id"}})
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract_params(config))
    moments = optax.adamw(1e-3).init(params)  # as far into a run as any: its moments random too
    moments = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) if x.dtype == np.float32 else x, moments)
    return {"params": params, "opt_state": moments}


def main():
    from preprocess import append_results, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="80M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    state = state_of(args.config)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    times = {"save (until committed)": [], "checksums written": [], "checksums verified": [], "restore": []}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            checkpointer = Checkpointer(Path(scratch) / "ckpt", async_save=False)
            began = time.perf_counter()
            checkpointer.manager.save(1, args=_save_args(state))  # orbax's save alone, checksums apart
            checkpointer.manager.wait_until_finished()
            times["save (until committed)"].append(time.perf_counter() - began)
            step_dir = epath.Path(scratch) / "ckpt" / "1"
            began = time.perf_counter()
            seal(step_dir)
            times["checksums written"].append(time.perf_counter() - began)
            began = time.perf_counter()
            assert verify(step_dir)
            times["checksums verified"].append(time.perf_counter() - began)
            began = time.perf_counter()
            checkpointer.manager.restore(1, args=_restore_args(abstract))
            times["restore"].append(time.perf_counter() - began)
            checkpointer.close()
            files = [Path(d) / n for d, _, names in step_dir.walk() for n in names]
            stored = sum(f.stat().st_size for f in files)
        print(repeat, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"\n## Checkpoint checksums ({date.today()}, {machine()})\n",
             f"`benchmarks/checkpoint_checksums.py --config {args.config}`: a training state of "
             f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters with AdamW's moments, "
             f"{size / 1e9:.2f} GB of float32 (all random), stored as {stored / 1e9:.2f} GB in {len(files)} files "
             f"(orbax, OCDBT) in this machine's temporary directory; median of {args.repeats} rounds; GB/s of the "
             f"stored bytes.\n",
             "| operation | seconds | GB/s |", "|---|---|---|"]
    for name, seconds in median.items():
        lines.append(f"| {name} | {seconds:.3f} | {stored / 1e9 / seconds:.2f} |")
    lines.append(f"\nVerifying adds {median['checksums verified'] / median['restore']:.0%} to a restore; writing "
                 f"the checksums (in the background, after the commit) costs "
                 f"{median['checksums written'] / median['save (until committed)']:.0%} of a save.")
    print("\n".join(lines))
    append_results(args.out, lines)


def _save_args(state):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))


def _restore_args(abstract):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())


if __name__ == "__main__":
    main()
