"""Training speed of the Idefics2-8B architecture on one accelerator: the whole train step (vision
tower, Perceiver, decoder, loss, backward, AdamW) for each attention implementation.

    python benchmarks/train_gpu.py [--text_layers 6] [--vision_layers 27] [--rows 1] [--seq 2048]
                                   [--images 4] [--implementations auto,xla] [--out benchmarks/RESULTS.md]

For a GPU (or TPU). The model is Idefics2's default config (SigLIP-SO400M at 980 px, Perceiver of
64 latents, Mistral-7B decoder) with `--text_layers` of the decoder's 32 layers (6: 2.7B
parameters; XLA:CPU's buffer assignment of the xla baseline's step gives 33 GB of weights, AdamW
state and batch and 40 GB of temporaries, the gradients and the vision tower's dense scores
[4, 16, 4,900, 4,900] among them: an H100's 80 GB hold that, not the 8B model) and
`--vision_layers` of the tower's 27, trained as the stage configs train: bfloat16 compute over
float32 weights, layers scanned, each rematerialised (`--remat`, stage 2's "full"). Random weights
and one packed batch: `--rows` rows of `--seq` tokens, each with `--images` images of 980 x 980
(4,900 patches, 64 `<image>` tokens each) and two samples (segments).

Reported per implementation: median step time after warm-up, tokens/s, and TFLOP/s over the step's
model FLOPs as training logs them (`train.flops.step_flops`: every weight matrix times the tokens
it multiplies, attention over visible pairs, no recomputation; the same number for every
implementation) against the measured bfloat16 matmul peak. Also the
loss of the last timed step: every implementation starts from the same weights and batch and runs
as many steps, so the losses agree to bfloat16 rounding.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

# the state and the xla baseline's temporaries take ~73 GB (XLA:CPU's buffer assignment of this step at
# the defaults): more than the 75% of a GPU's memory jax takes by default, less than an H100's 80 GB
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import matmul_peak  # noqa: E402
from preprocess import append_results  # noqa: E402
from train_step import median_step_time  # noqa: E402

from idefics_jax import Idefics2, Idefics2Config  # noqa: E402
from idefics_jax.sharding import make_mesh  # noqa: E402
from idefics_jax.train.flops import maxtext_step_flops, peak_flops, step_flops  # noqa: E402
from idefics_jax.train.optimizer import make_optimizer  # noqa: E402
from idefics_jax.train.step import init_state, make_train_step, place_batch  # noqa: E402


def packed_batch(config: Idefics2Config, rows: int, seq: int, images: int, size: int, rng) -> dict:
    """One packed batch (data/packing.py's dict): per row two samples, the first holding `images`
    images (their `<image>` tokens at its start), random text tokens, random normalised pixels."""
    n_image_tokens = images * config.image_seq_len
    if n_image_tokens >= seq // 2:
        raise SystemExit(f"--images {images} x {config.image_seq_len} tokens do not fit half of --seq {seq}")
    vocab = config.text.vocab_size
    tokens = rng.integers(3, min(vocab, 32000), (rows, seq)).astype(np.int32)
    tokens[tokens == config.image_token_id] = 3
    tokens[:, :n_image_tokens] = config.image_token_id
    split = seq // 2
    segment_ids = np.where(np.arange(seq) < split, 1, 2)[None].repeat(rows, 0).astype(np.int32)
    positions = np.where(segment_ids == 1, np.arange(seq), np.arange(seq) - split).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    targets[:, split - 1] = 0  # a sample's last token predicts nothing
    loss_mask = (tokens != config.image_token_id) & (targets != 0)
    return dict(input_ids=tokens, segment_ids=segment_ids, positions=positions, targets=targets, loss_mask=loss_mask,
                pixel_values=rng.normal(size=(rows, images, size, size, 3)).astype(np.float32),
                pixel_attention_mask=np.ones((rows, images, size, size), bool))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text_layers", type=int, default=6)
    parser.add_argument("--vision_layers", type=int, default=27)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=980)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--implementations", default="auto,xla")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on CPU: the tiny preset's model, 256 tokens, 1 image of 112 px")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    config = Idefics2Config.preset("tiny") if args.quick else Idefics2Config()
    if args.quick:
        args.text_layers, args.vision_layers, args.seq, args.images, args.image_size = 2, 2, 256, 1, 112
        args.steps = 1
    config = config.replace(text=config.text.replace(num_hidden_layers=args.text_layers),
                            vision=config.vision.replace(num_hidden_layers=args.vision_layers))
    batch = packed_batch(config, args.rows, args.seq, args.images, args.image_size, np.random.default_rng(0))
    mesh = make_mesh()
    tx, _ = make_optimizer(learning_rate=1e-5, warmup_steps=10, total_steps=1000)
    tokens = args.rows * args.seq
    implementations = args.implementations.split(",")
    flops = step_flops(config, batch)  # what training logs its MFU over (perf/mfu)
    maxtext_flops = maxtext_step_flops(config, batch)  # MaxText's convention, for its published MFU
    results = []
    for impl in implementations:
        model = Idefics2(config, attention_impl=impl, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                         remat=args.remat, scan_layers=True)
        state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
        placed = place_batch(batch, mesh)
        try:
            seconds, loss = median_step_time(make_train_step(model, tx, mesh), state, placed, args.steps)
        except Exception as e:  # one implementation that fails is reported, not the run lost
            results.append((impl, None, None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            print(results[-1], flush=True)
            continue
        finally:
            del state
        results.append((impl, seconds, loss, ""))
        print(results[-1], flush=True)
    peak = matmul_peak(5, 10, n=1024 if args.quick else 8192)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
        lambda: Idefics2(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])))
    dev = jax.devices()[0]
    published = peak_flops(dev.device_kind) or 0.0  # the datasheet's dense bf16 peak, as MFU is quoted
    lines = [f"\n## Train step, Idefics2-{'tiny' if args.quick else '8B'} architecture ({datetime.date.today()})\n",
             f"Machine: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {len(jax.devices())} device(s).\n",
             f"Command: `python benchmarks/train_gpu.py {'--quick ' if args.quick else ''}--text_layers {args.text_layers} --vision_layers "
             f"{args.vision_layers} --rows {args.rows} --seq {args.seq} --images {args.images} --image_size "
             f"{args.image_size} --remat {args.remat} --steps {args.steps} --implementations {args.implementations}` "
             f"({params / 1e6:,.0f}M parameters; bfloat16 compute, float32 weights and AdamW; layers scanned; "
             f"{tokens:,} tokens a step with {args.rows * args.images} image(s); model FLOPs {flops / 1e12:.2f} TFLOP a "
             f"step, {maxtext_flops / 1e12:.2f} as MaxText counts them; measured bf16 matmul peak {peak:.0f} "
             f"TFLOP/s; MFU against the device's published bf16 peak {published / 1e12:.0f} TFLOP/s).\n",
             "| attention | step (s) | tokens/s | TFLOP/s | % of measured peak | MFU (MaxText's count) | last loss | note |",
             "|---|---|---|---|---|---|---|---|"]
    for impl, seconds, loss, note in results:
        if seconds is None:
            lines.append(f"| {impl} | | | | | | | {note} |")
            continue
        rate = flops / seconds / 1e12
        mfu = f"{100 * maxtext_flops / seconds / published:.0f}%" if published else "-"
        lines.append(f"| {impl} | {seconds:.3f} | {tokens / seconds:,.0f} | {rate:.1f} | {100 * rate / peak:.0f}% "
                     f"| {mfu} | {loss:.4f} | {note} |")
    print("\n".join(lines), flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
