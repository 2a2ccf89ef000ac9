"""Cost of choosing a sampled token: the logit filters (temperature, top-k, top-p, min-p) of
`inference/sampling.py` on a decode step's logits, per row (`process_logits_rows`, continuous
batching) and for one setting per batch (`process_logits`, `Generator`).

    python benchmarks/sampling.py [--rows 8] [--vocab 32003] [--repeats 20] [--out benchmarks/RESULTS.md]

Logits: each row a Zipf law over a shuffled vocabulary (probability of the r-th token ~ r^-a,
before the temperature of 0.8): a = 1.5 is peaked (the nucleus of p = 0.9 is 8 tokens, within the
256 candidates the filters look at first), a = 1.0 is flat (a nucleus of 908 tokens: the whole
vocabulary is sorted). Median of
`--repeats` jitted calls after a warm-up, float32, this machine's CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


SETTINGS = {  # name -> Sampling kwargs
    "top_k=50": dict(temperature=0.8, top_k=50),
    "top_p=0.9": dict(temperature=0.8, top_p=0.9),
    "top_k=50, top_p=0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_k=1000": dict(temperature=0.8, top_k=1000),
    "min_p=0.05": dict(temperature=0.8, min_p=0.05),
}


def zipf_logits(rng, rows: int, vocab: int, exponent: float):
    ranks = np.stack([rng.permutation(vocab) + 1 for _ in range(rows)])
    return (-exponent * np.log(ranks)).astype(np.float32)


def median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    from preprocess import append_results, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32003)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from idefics_jax.inference.sampling import RowSampling, Sampling, process_logits, process_logits_rows

    rng = np.random.default_rng(0)
    seen = jnp.zeros((args.rows, args.vocab), bool)
    lines = [f"\n## Sampling filters ({args.rows} rows x {args.vocab:,} tokens)\n", f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/sampling.py --rows {args.rows} --vocab {args.vocab} --repeats "
             f"{args.repeats}` (median ms of a jitted call; Zipf logits, exponent a).\n",
             "| setting | logits | per row: process_logits_rows (ms) | one setting: process_logits (ms) "
             "| tokens kept (mean) |", "|---|---|---|---|---|"]
    for exponent in (1.5, 1.0):
        logits = jnp.asarray(zipf_logits(rng, args.rows, args.vocab, exponent))
        for name, kwargs in SETTINGS.items():
            sampling = Sampling(**kwargs)
            rows = RowSampling.of([sampling] * args.rows)
            per_row = jax.jit(process_logits_rows)
            one = jax.jit(lambda x, s=sampling: process_logits(x, s))
            kept = float(np.isfinite(np.asarray(one(logits))).sum(-1).mean())
            lines.append(f"| {name} | Zipf a={exponent} | {median_ms(per_row, logits, rows, seen, repeats=args.repeats):.2f} "
                         f"| {median_ms(one, logits, repeats=args.repeats):.2f} | {kept:,.0f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
