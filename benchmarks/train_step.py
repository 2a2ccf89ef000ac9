"""Train-step speed: our jitted step against transformers + torch training the same model on the
same batch with AdamW, in one run, on this machine's CPU.

    python benchmarks/train_step.py [--steps 5] [--out benchmarks/RESULTS.md]

Configs: `tiny` (the preset at 112 px), an ~80M-parameter Idefics2 (vision 384 wide x 6 layers at
378 px, Perceiver 64 latents x 3, decoder 512 wide x 8 layers, 32,003-token vocabulary), and
`smolvlm-256m`, SmolVLM-256M's shape (`--configs smolvlm-256m`; not in the default set: a step
takes seconds here). Both frameworks start from the same weights (converted) and run float32;
compile time is excluded (first steps are warm-up), and the median step time is reported.

Next to the times it reports how far a step could go on this machine: the FLOPs of our step
(XLA's cost analysis of the compiled step), the GFLOP/s each framework reaches over the step, and
a floor: every matrix product of our step (read off its jaxpr, scans counted `length` times)
timed alone at its shape, in jax and in torch, the faster of the two counted. No step can beat
that floor, since it leaves out attention's softmax, the norms, the optimizer and all layout
copies; "speed-up at the floor" is torch's step over it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "tiny": dict(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=112, patch_size=14),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16,
                              num_key_value_heads=2),
        text_config=dict(model_type="mistral", vocab_size=1027, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=512),
        image_token_id=1025, batch=8, seq=256, image=(112, 84)),
    "80M": dict(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                           image_size=378, patch_size=14),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=8, resampler_head_dim=64,
                              num_key_value_heads=4),
        text_config=dict(model_type="mistral", vocab_size=32003, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, sliding_window=4096),
        image_token_id=32001, batch=2, seq=512, image=(378, 378)),
    # SmolVLM-256M's shape (the `smolvlm-256m` preset): SigLIP-B/16 at 512 px, pixel shuffle 4 (64
    # tokens per tile), SmolLM2-135M; one 512 px tile per row
    "smolvlm-256m": dict(
        model_type="smolvlm",
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, pad_token_id=2),
        scale_factor=4, tie_word_embeddings=False, image_token_id=49190, batch=2, seq=512, image=(512, 512)),
}
MODEL_KEYS = ("image_token_id", "scale_factor", "tie_word_embeddings")  # a spec's top-level config keys


# both frameworks' optimizer: AdamW at a constant rate, decay on matrices (not norms, biases, latents)
ADAMW = dict(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)


def hf_classes(spec: dict):
    """(transformers' config class, model class) of a spec's model type (Idefics2 unless it names another)."""
    import transformers

    name = {"idefics2": "Idefics2", "smolvlm": "SmolVLM"}[spec.get("model_type", "idefics2")]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForConditionalGeneration")


def save_random_model(name: str) -> tuple[Path, int]:
    """A random transformers model of config `name`, saved to a temporary directory; (directory, parameters)."""
    import torch

    spec = CONFIGS[name]
    config_class, model_class = hf_classes(spec)
    hf_config = config_class(**{k: v for k, v in spec.items() if k.endswith("config") or k in MODEL_KEYS})
    torch.manual_seed(0)
    hf_dir = Path(tempfile.mkdtemp()) / name
    model = model_class(hf_config)
    model.save_pretrained(hf_dir)
    return hf_dir, sum(p.numel() for p in model.parameters())


def make_batch(spec, rng):
    """One sample per row: text, 64 image tokens, text; labels on the text after the image."""
    batch, seq, (h, w) = spec["batch"], spec["seq"], spec["image"]
    image_id, vocab = spec["image_token_id"], spec["text_config"]["vocab_size"]
    ids = rng.integers(3, image_id - 1, (batch, seq)).astype(np.int64)
    ids[:, 8:8 + 64] = image_id
    pixels = rng.uniform(-1, 1, (batch, 1, h, w, 3)).astype(np.float32)
    mask = np.ones((batch, 1, h, w), bool)
    labels = ids.copy()
    labels[:, :8 + 64] = -100
    assert ids.max() < vocab
    return ids, pixels, mask, labels


def train_batch(ids, pixels, mask, labels) -> dict:
    """`make_batch`'s arrays as our training step's batch (next-token targets, loss on the labelled text)."""
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[:, :-1] = labels[:, 1:] != -100
    return {"input_ids": ids.astype(np.int32), "segment_ids": np.ones(ids.shape, np.int32),
            "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy(),
            "targets": targets.astype(np.int32), "loss_mask": loss_mask, "pixel_values": pixels,
            "pixel_attention_mask": mask}


def time_torch(hf_dir, spec, ids, pixels, mask, labels, steps):
    import torch

    torch.manual_seed(0)
    model = hf_classes(spec)[1].from_pretrained(hf_dir, attn_implementation="sdpa").train()
    # ours exactly (`ADAMW`): a constant rate, b2 = 0.95, weight decay on matrices but the latents
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("latents")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("latents"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=ADAMW["learning_rate"],
                            betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"])
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                  pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3), pixel_attention_mask=torch.tensor(mask),
                  labels=torch.tensor(labels), use_cache=False)  # training builds no KV cache
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), float(loss.detach())


def best_seconds(fn, min_time=0.2) -> float:
    """Fastest of repeated calls of `fn` (which waits for its result), after one warm-up call."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def matmul_floor(shapes: dict, distinct: bool = False) -> float:
    """Seconds the products `{(batch, m, k, n): count}` take at the faster of jax and torch, each
    shape timed alone as a (batched) float32 matrix product (jax: repeated inside one call, so that
    a small product is not timed with the call's own overhead, which a step does not pay per
    product). `distinct`: every product takes a right-hand matrix of its own and all are timed
    together in one call, as weights read once per step are (a decode step's): they come from
    memory, not from a cache one matrix alone would fit."""
    import jax
    import jax.numpy as jnp
    import torch

    @functools.partial(jax.jit, static_argnums=1)
    def repeated(pairs, times: int):  # the products `times` over in one call, each round after the last
        def round_(_, carry):
            outs = [jnp.matmul(lhs + carry, rhs) for lhs, rhs in pairs]
            return sum(out[..., 0, 0].sum() for out in outs) * 1e-9

        return jax.lax.fori_loop(0, times, round_, jnp.float32(0))

    def fastest(pairs):  # [(lhs, rhs)] numpy -> seconds for all products, jax or torch
        jax_pairs = [(jnp.asarray(lhs), jnp.asarray(rhs)) for lhs, rhs in pairs]
        once = best_seconds(lambda: repeated(jax_pairs, 1).block_until_ready())
        times = int(np.clip(0.02 / once, 1, 100))  # rounds enough to hide the call's own overhead
        torch_pairs = [(torch.from_numpy(lhs), torch.from_numpy(rhs)) for lhs, rhs in pairs]
        return min(best_seconds(lambda: repeated(jax_pairs, times).block_until_ready()) / times,
                   best_seconds(lambda: [torch.matmul(lhs, rhs) for lhs, rhs in torch_pairs]))

    operands = lambda b, m, k, n, i=0: (np.ones((b, m, k), np.float32), np.full((b, k, n), 1 + i, np.float32))
    if distinct:
        return fastest([operands(*shape, i) for shape, count in shapes.items() for i in range(count)])
    return sum(fastest([operands(*shape)]) * count for shape, count in shapes.items())


def time_ours(hf_dir, ids, pixels, mask, labels, steps):
    import flax.linen as nn
    import jax

    from idefics_jax import Idefics2, load_hf_checkpoint
    from idefics_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
    from idefics_jax.train.data import global_batch
    from idefics_jax.train.flops import dot_shapes
    from idefics_jax.train.optimizer import make_optimizer
    from idefics_jax.train.step import init_state, make_train_step, train_step_fn

    config, params = load_hf_checkpoint(hf_dir, on_device=False)
    model = Idefics2(config)
    tx, _ = make_optimizer(**ADAMW, warmup_steps=1, total_steps=100, end_lr_ratio=1.0, grad_clip=0.0)  # constant rate
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
    state = state.replace(params=jax.tree.map(lambda p, s: jax.device_put(p, s.sharding), params, state.params))
    step = make_train_step(model, tx, mesh)
    batch = global_batch(train_batch(ids, pixels, mask, labels), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        traced = jax.jit(train_step_fn(model, tx)).trace(state, batch)  # one trace: products and FLOPs
        shapes = dot_shapes(traced.jaxpr.jaxpr)
        flops = traced.lower().compile().cost_analysis()["flops"]
    seconds, loss = median_step_time(step, state, batch, steps)
    return seconds, loss, flops, shapes


def median_step_time(step, state, batch, steps: int) -> tuple[float, float]:
    """(median seconds of `steps` steps after 2 warm-up steps, the last loss)."""
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), loss


def main():
    from preprocess import add_malloc_option, append_results, apply_malloc, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="tiny,80M")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    add_malloc_option(parser, "reuse")  # as our command line does
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)  # before torch or XLA start their threads
    import torch

    torch.set_num_threads(os.cpu_count())  # both frameworks on every core (XLA:CPU takes them all)
    lines = [f"\n## Train step ({datetime.date.today()})\n", f"Machine: {machine()}, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), XLA:CPU on {os.cpu_count()} cores.\n",
             f"Command: `python benchmarks/train_step.py --configs {args.configs} --steps {args.steps} {malloc}` (float32, the same AdamW on both "
             "sides (constant rate 1e-4, b2 0.95, weight decay 0.01 on matrices), same weights and batch; median step "
             "after 2 warm-up steps; ours jitted, theirs eager with SDPA attention and no KV cache).\n",
             "| config | parameters | batch x tokens | transformers + torch (s/step) | ours (s/step) | "
             "ours (tokens/s) | speed-up | step GFLOP | torch GFLOP/s | ours GFLOP/s | matrix-product floor (s) | "
             "speed-up at the floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        hf_dir, count = save_random_model(name)
        data = make_batch(spec, rng)
        theirs, loss_t = time_torch(hf_dir, spec, *data, args.steps)
        ours, loss_o, flops, shapes = time_ours(hf_dir, *data, args.steps)
        floor = matmul_floor(shapes)
        tokens = spec["batch"] * spec["seq"]
        lines.append(f"| {name} | {count / 1e6:.1f}M | {spec['batch']} x {spec['seq']} | {theirs:.3f} | {ours:.3f} | "
                     f"{tokens / ours:,.0f} | {theirs / ours:.2f}x | {flops / 1e9:.1f} | {flops / theirs / 1e9:.0f} | "
                     f"{flops / ours / 1e9:.0f} | {floor:.3f} | {theirs / floor:.2f}x |")
        print(lines[-1], f"(last-step losses, transformers / ours, after the same {args.steps + 2} steps: {loss_t:.4f} / "
              f"{loss_o:.4f}; {len(shapes)} product shapes)", flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
