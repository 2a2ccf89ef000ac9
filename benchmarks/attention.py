"""Attention implementations at Idefics2's shapes: TFLOP/s and fraction of the measured bf16 peak.

    python benchmarks/attention.py [--repeats 10] [--quick]
        [--implementations xla,cudnn,pallas,pallas:triton,pallas:mgpu:64x64s3,pallas:mgpu:bwd,pallas:128x64w8s3]
        [--calls 10]
        [--out benchmarks/RESULTS.md]

Runs on a GPU (every implementation the backend offers: xla, cudnn, pallas); elsewhere it
measures what runs there (on CPU only a --quick smoke run makes sense). Shapes (bfloat16):
  vision   SigLIP-SO400M: 4 images x 4,900 patches (980 px / 14), 16 heads x 72, bidirectional,
           about 15% padded patches per image (the key mask of a non-square image);
  text 4k  Mistral: 2 x 4,096 tokens, 32 query / 8 key-value heads x 128, causal, window 4,096,
           packed rows of 4 segments;
  text 8k  the same at 1 x 8,192;
  perceiver the resampler's 64 latents over [patches; latents] of 8 images (4,900 + 64 keys, 15% of
           the patches padded), 16 query / 4 key-value heads x 96, bidirectional: `pallas` is the
           pooling kernel there (one query tile), `pallas:...` specs the flash kernels.
FLOPs are counted over the visible (query, key) pairs only (4 * pairs * head_dim forward, 2.5x
that for the backward), so skipping masked blocks is not counted as work. Peak: a 8192^3 bf16
matmul timed in the same run. Results are appended to RESULTS.md (a table per run).
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import append_results  # noqa: E402

from idefics_jax.kernels import Blocks, flash_attention  # noqa: E402
from idefics_jax.kernels.flash import default_blocks  # noqa: E402
from idefics_jax.ops.attention import attention_mask, dot_product_attention, select_implementation  # noqa: E402


def pallas_blocks(spec: str) -> Blocks:
    """`pallas:<block_q>x<block_k>[d<dK/dV query tile>][w<warps>][s<stages>]`, e.g. `pallas:128x64d64w8s2`:
    the Pallas kernels with these tiles instead of the defaults (a block-size sweep on a GPU)."""
    match = re.fullmatch(r"(\d+)x(\d+)(?:d(\d+))?(?:w(\d+))?(?:s(\d+))?", spec)
    if not match:
        raise ValueError(f"pallas tiles '{spec}': expected e.g. 128x64d64w8s2")
    bq, bk, dkv, warps, stages = (None if g is None else int(g) for g in match.groups())
    return Blocks(block_q=bq, block_k=bk, block_q_dkv=dkv, num_warps=warps, num_stages=stages or 2)


def mgpu_blocks(spec: str, head_dim: int) -> Blocks:
    """`mgpu[:<block_q>x<block_k>s<stages>]`: the Mosaic GPU (Hopper) forward, at these tiles (block_q
    per compute warpgroup) or its defaults, before the Triton backward at its default tiles;
    `mgpu:bwd[:<block_k>x<block_q>s<stages>]`: the backward by Mosaic GPU too (`Blocks.mgpu_bwd`; both
    by Mosaic GPU is the default on Hopper, what plain `pallas` runs there)."""
    blocks = default_blocks("gpu", head_dim)._replace(forward="mgpu", backward="triton")
    tiles = lambda match: tuple(int(g) for g in match.groups())
    if spec == "mgpu":
        return blocks
    if spec == "mgpu:bwd":
        return blocks._replace(backward="mgpu")
    if match := re.fullmatch(r"mgpu:bwd:(\d+)x(\d+)s(\d+)", spec):
        return blocks._replace(backward="mgpu", mgpu_bwd=tiles(match))
    if match := re.fullmatch(r"mgpu:(\d+)x(\d+)s(\d+)", spec):
        return blocks._replace(mgpu=tiles(match))
    raise ValueError(f"mgpu tiles '{spec}': expected e.g. mgpu:64x128s2, mgpu:bwd or mgpu:bwd:64x64s2")


def attention_fn(impl: str, mask_kw: dict):
    if impl == "pallas:triton":  # the default tiles, all Triton (on Hopper the default is Mosaic GPU's)
        return lambda q, k, v: flash_attention(q, k, v, blocks=default_blocks("gpu", q.shape[-1])._replace(
            forward="triton", backward="triton"), **mask_kw)
    if impl.startswith("pallas:mgpu"):
        return lambda q, k, v: flash_attention(q, k, v, blocks=mgpu_blocks(impl.split(":", 1)[1], q.shape[-1]),
                                               **mask_kw)
    if impl.startswith("pallas:"):
        blocks = pallas_blocks(impl.split(":", 1)[1])
        return lambda q, k, v: flash_attention(q, k, v, blocks=blocks, **mask_kw)
    return lambda q, k, v: dot_product_attention(q, k, v, implementation=impl, **mask_kw)


def timed(fn, *args, repeats: int, calls: int = 1) -> float:
    """Median seconds of `fn(*args)` after a warm-up call (compilation), over `repeats` rounds of
    `calls` calls dispatched back to back (the device's time per call, once `calls` hides the
    host's dispatch and wait: kernels of a millisecond want ~10)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def matmul_peak(repeats: int, calls: int, n: int = 8192) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(jnp.dot)  # bfloat16 in and out, float32 accumulation inside
    return 2 * n**3 / timed(f, a, b, repeats=repeats, calls=calls) / 1e12


def shapes(quick: bool):
    """name -> (batch, q_len, kv_len, heads, kv_heads, head_dim, mask kwargs builder)."""
    scale = 8 if quick else 1

    def vision(batch, seq, rng, latents=0):
        real = int((seq - latents) * 0.85)
        kv_mask = np.zeros((batch, seq), bool)
        kv_mask[:, :real] = True
        kv_mask[:, seq - latents:] = True  # the Perceiver's latents: always valid keys
        return dict(kv_mask=jnp.asarray(kv_mask))

    def text(batch, seq, rng, window=4096 // scale):
        bounds = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
        seg = np.zeros((batch, seq), np.int32)
        pos = np.zeros((batch, seq), np.int32)
        for b in range(batch):
            starts = np.concatenate([[0], bounds, [seq]])
            for s, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
                seg[b, lo:hi], pos[b, lo:hi] = s, np.arange(hi - lo)
        seg, pos = jnp.asarray(seg), jnp.asarray(pos)
        return dict(causal=True, sliding_window=window, q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg)

    same = lambda batch, seq, *rest: (batch, seq, seq, *rest)
    latents = lambda batch, seq, rng: vision(batch, seq, rng, latents=64)
    return {
        "vision (4 x 4900, 16 x 72, bidirectional, padding)": same(4, 4900 // scale, 16, 16, 72, vision),
        "text 4k (2 x 4096, 32/8 x 128, causal, window 4096, packed)": same(2, 4096 // scale, 32, 8, 128, text),
        "text 8k (1 x 8192, 32/8 x 128, causal, window 4096, packed)": same(1, 8192 // scale, 32, 8, 128, text),
        "perceiver (8 x 64 latents over 4900 + 64, 16/4 x 96, padding)": (8, 64, 4900 // scale + 64, 16, 4, 96,
                                                                          latents),
    }


def visible_pairs(q_len, kv_len, mask_kw) -> float:
    """Exact count of visible (query, key) pairs, summed over the batch, from the reference mask."""
    total = 0
    batch = next(iter(v.shape[0] for v in mask_kw.values() if hasattr(v, "shape")))
    for b in range(batch):
        one = {k: (v[b:b + 1] if hasattr(v, "shape") else v) for k, v in mask_kw.items()}
        total += int(jnp.sum(attention_mask(q_len, kv_len, **one)))
    return float(total)


def bench_shape(name, spec, implementations, repeats, calls, rng):
    batch, q_len, kv_len, heads, kv_heads, head_dim, make_mask = spec
    mask_kw = make_mask(batch, kv_len, rng)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    pairs = visible_pairs(q_len, kv_len, mask_kw) * heads
    fwd_flops = 4 * pairs * head_dim
    reference = lambda q, k, v: dot_product_attention(q, k, v, **mask_kw)
    ref = np.asarray(jax.jit(reference)(q, k, v), np.float32)
    ref_grads = [np.asarray(g, np.float32) for g in jax.jit(lambda q, k, v, d: jax.vjp(reference, q, k, v)[1](d))(
        q, k, v, dout)]
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())
    rows = []
    for impl in implementations:
        family = impl.split(":")[0]
        chosen = select_implementation(family, q, k, causal=mask_kw.get("causal", False),
                                       positions="q_positions" in mask_kw, segments="q_segment_ids" in mask_kw)
        if chosen != family:
            rows.append((name, impl, None, None, f"falls back to {chosen}"))
            continue
        attend = attention_fn(impl, mask_kw)
        fwd = jax.jit(attend)
        fwd_bwd = jax.jit(lambda q, k, v, dout: jax.vjp(attend, q, k, v)[1](dout))
        try:
            out = np.asarray(fwd(q, k, v), np.float32)
            err = rel(out, ref)
            grad_err = max(rel(g, r) for g, r in zip(fwd_bwd(q, k, v, dout), ref_grads))
            t_fwd = timed(fwd, q, k, v, repeats=repeats, calls=calls)
            t_all = timed(fwd_bwd, q, k, v, dout, repeats=repeats, calls=calls)
        except Exception as e:  # an implementation that fails to compile is reported, not hidden
            rows.append((name, impl, None, None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
            continue
        rows.append((name, impl, (t_fwd, fwd_flops / t_fwd / 1e12), (t_all, 3.5 * fwd_flops / t_all / 1e12),
                     f"max rel. diff to xla {err:.1e}, gradients {grad_err:.1e}"))
        print(rows[-1], flush=True)
    return rows


def machine() -> str:
    dev = jax.devices()[0]
    return f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="shapes / 8 (a smoke run, e.g. on CPU)")
    parser.add_argument("--implementations", default="xla,cudnn,pallas",
                        help="comma-separated; 'pallas:128x64d64w8s2' runs the Pallas kernels with those tiles, "
                             "'pallas:triton' all Triton, 'pallas:mgpu[:64x64s3]' the Mosaic GPU forward "
                             "(at those tiles) and Triton's backward, 'pallas:mgpu:bwd[:64x64s2]' both Mosaic GPU's "
                             "(the default on Hopper)")
    parser.add_argument("--calls", type=int, default=10, help="calls per timed round, dispatched back to back")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    peak = matmul_peak(args.repeats, args.calls)
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for name, spec in shapes(args.quick).items():
        rows += bench_shape(name, spec, args.implementations.split(","), args.repeats, args.calls, rng)
    lines = [f"\n## Attention ({datetime.date.today()})\n", f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/attention.py --repeats {args.repeats}"
             f" --calls {args.calls}{' --quick' if args.quick else ''} --implementations {args.implementations}` (bfloat16; FLOPs over visible pairs; measured bf16 matmul "
             f"peak {peak:.0f} TFLOP/s).\n",
             "| shape | implementation | forward ms | forward TFLOP/s | % of peak | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| % of peak | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, impl, fwd, both, note in rows:
        if fwd is None:
            lines.append(f"| {name} | {impl} | | | | | | | {note} |")
            continue
        lines.append(f"| {name} | {impl} | {fwd[0] * 1e3:.2f} | {fwd[1]:.0f} | {100 * fwd[1] / peak:.0f}% "
                     f"| {both[0] * 1e3:.2f} | {both[1]:.0f} | {100 * both[1] / peak:.0f}% | {note} |")
    print("\n".join(lines))
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
