"""Preprocessing speed: our image processor against transformers' Idefics2ImageProcessor, and the
packed-row throughput of the Grain pipeline with 0 and 2 worker processes.

    python benchmarks/preprocess.py [--images 200] [--out benchmarks/RESULTS.md]

Both processors get the same decoded PIL images in one run (mixed sizes from 32 px to 1600 px,
RGB and a few other modes), with and without image splitting; the pipeline reads synthetic data
it generates into a temporary directory. Results are appended to RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(32, 1600, size=2))
        # smooth content (a gradient plus a little noise), as photos and documents are
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1)
        image = Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))
        if i % 10 == 1:
            image = image.convert("L")
        elif i % 10 == 2:
            image = image.convert("RGBA")
        images.append(image)
    return images


def time_it(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_processors(images, split: bool) -> dict:
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from idefics_jax.data.image_processing import ImageProcessor

    ours = ImageProcessor(do_image_splitting=split)
    reference = Idefics2ImageProcessorPil(do_image_splitting=split)
    # the same work on both sides: one image per call, the whole call (resize, normalise, split, then
    # pad, the pixel mask and a stacked numpy batch)
    ours_s = time_it(lambda: [ours([[im]]) for im in images])
    ref_s = time_it(lambda: [reference(images=[[im]], return_tensors="np") for im in images])
    # check they agree on a few
    for im in images[:5]:
        a = ours([[im]])["pixel_values"]
        b = np.moveaxis(reference(images=[[im]], return_tensors="np")["pixel_values"], 2, -1)
        assert np.abs(a - b).max() <= 1e-5
    return {"ours": len(images) / ours_s, "reference": len(images) / ref_s}


def bench_pipeline(workers: int, rows: int = 96) -> float:
    from idefics_jax.data.packing import PackConfig
    from idefics_jax.data.pipeline import Pipeline, SourceConfig
    from idefics_jax.data.synthetic import generate
    from idefics_jax.data.tokenizer import Tokenizer

    data = Path(tempfile.mkdtemp()) / "synthetic"
    if not (data / "tokenizer.model").exists():
        generate(data, num=300, seed=0, formats=("jsonl",))
    tokenizer = Tokenizer(data / "tokenizer.model")
    sources = [SourceConfig(n, str(data / n), weight=w, longest_edge=384, shortest_edge=378)
               for n, w in (("pairs", 0.3), ("interleaved", 0.4), ("conversations", 0.3))]
    pack = PackConfig(seq_len=2048, image_slots=8, buckets=((384, 384),))
    pipeline = Pipeline(sources, tokenizer, pack, batch_size=4, image_seq_len=64, seed=0, shard_index=0,
                        shard_count=1, num_workers=workers)
    for _ in range(max(2, workers)):  # start-up (every worker process) is not counted
        next(pipeline)
    start = time.perf_counter()
    for _ in range(rows // 4):
        next(pipeline)
    return rows / (time.perf_counter() - start)


def machine() -> str:
    import jax
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
            f"Pillow {Image.__version__}, transformers {transformers.__version__}, jax {jax.__version__}")


def add_malloc_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--malloc`: reuse = glibc keeps freed memory (idefics_jax.host_memory), as the training command
    line sets it on CPU; the process's allocator, so both frameworks run with it."""
    parser.add_argument("--malloc", choices=("reuse", "default"), default=default,
                        help="reuse: glibc keeps freed memory (idefics_jax.host_memory), as `python -m "
                             "idefics_jax.train` sets it on CPU; it is the process's allocator, so both frameworks "
                             "run with it (default %(default)s)")


def apply_malloc(choice: str) -> str:
    """Sets the allocator `--malloc` chose, before anything computes; the option's words for the results."""
    if choice == "reuse":
        from idefics_jax.host_memory import reuse_freed_memory

        if not reuse_freed_memory():
            raise SystemExit("--malloc reuse needs glibc's allocator; run with --malloc default")
    return f"--malloc {choice}"


def append_results(path: str, lines: list[str]) -> None:
    """Appends one run's section to RESULTS.md (with the file's header when it is new)."""
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nEach section is one run of a script in `benchmarks/`.\n")
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    images = make_images(args.images)
    lines = [f"\n## Preprocessing ({datetime.date.today()})\n", f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/preprocess.py --images {args.images}` "
             "(same decoded images for both processors, one image per call, each side's whole call: resize, "
             "normalise, split, pad, pixel mask, stacked numpy batch; ours `ImageProcessor.__call__`, theirs "
             "`Idefics2ImageProcessorPil.__call__(return_tensors='np')`).\n",
             "| processor | splitting | ours (images/s) | transformers (images/s) | speed-up |",
             "|---|---|---|---|---|"]
    for split in (False, True):
        r = bench_processors(images, split)
        lines.append(f"| Idefics2ImageProcessor | {'yes' if split else 'no'} | {r['ours']:.1f} | {r['reference']:.1f} "
                     f"| {r['ours'] / r['reference']:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "| pipeline (synthetic mix, seq 2048, 8 image slots, 384 px) | packed rows/s |", "|---|---|"]
    for workers in (0, 2):
        lines.append(f"| {workers} worker processes | {bench_pipeline(workers):.1f} |")
        print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
