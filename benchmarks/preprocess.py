"""Preprocessing speed: our image processor against transformers' Idefics2ImageProcessor, the
packed-row throughput of the Grain pipeline with 0 and 2 worker processes, and The Cauldron's
Parquet rows through our pipeline against the usual PyTorch path.

    python benchmarks/preprocess.py [--images 200] [--parts processors,pipeline,cauldron]
        [--cauldron-rows 400] [--out benchmarks/RESULTS.md]

Both processors get the same decoded PIL images in one run (mixed sizes from 32 px to 1600 px,
RGB and a few other modes), with and without image splitting; the pipeline reads synthetic data
it generates into a temporary directory. The Cauldron part writes a Cauldron-shaped Parquet file
with `datasets` (as the Hub's files are written: one JPEG of 200-1000 px and 1-3 Q/A turns a row,
its image features in the file's metadata) and reads it both ways: ours, `Pipeline` over the
Parquet source into packed rows of 2048 tokens (answer-only loss); theirs, `datasets` (images
decoded to PIL by their feature), transformers' `Idefics2Processor` (chat template, image
processor, tokenizer) and the collator of its fine-tuning tutorial (padded batches, labels with
pad and image tokens masked) in a torch `DataLoader`; both shuffled, no image splitting, 980 px,
64 tokens per image, the same tokenizer. Results are appended to RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import datetime
import io
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


def cauldron_file(directory: Path, rows: int, seed: int = 0) -> Path:
    """A Cauldron-shaped Parquet file written by `datasets` (see the module's doc)."""
    import datasets

    rng = np.random.default_rng(seed)
    words = "the a red blue cat boat seven tree house green what is written in this image".split()
    say = lambda k: " ".join(rng.choice(words, k))
    images, texts = [], []
    for image in make_images(rows, seed):
        out = io.BytesIO()
        image.convert("RGB").resize((int(rng.integers(200, 1000)), int(rng.integers(200, 1000)))).save(out, "JPEG")
        images.append([{"bytes": out.getvalue(), "path": None}])
        texts.append([{"user": f"{say(6)}?", "assistant": say(3), "source": "bench"} for _ in range(rng.integers(1, 4))])
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}]})
    path = directory / "train-00000-of-00001.parquet"
    datasets.Dataset.from_dict({"images": images, "texts": texts}, features=features).to_parquet(str(path))
    return path


def bench_cauldron_ours(path: Path, tokenizer_path: Path, samples: int, workers: int) -> dict:
    from idefics_jax.data.packing import PackConfig
    from idefics_jax.data.pipeline import Pipeline, SourceConfig
    from idefics_jax.data.tokenizer import Tokenizer

    source = SourceConfig("cauldron", str(path), format="parquet", longest_edge=980, shortest_edge=378)
    pipeline = Pipeline([source], Tokenizer(tokenizer_path), PackConfig(seq_len=2048, image_slots=8,
                                                                        buckets=((980, 980),)),
                        batch_size=4, image_seq_len=64, seed=0, shard_index=0, shard_count=1, num_workers=workers,
                        read_threads=1, read_buffer=8)
    for _ in range(max(2, workers)):  # start-up (every worker process) is not counted
        next(pipeline)
    start_samples, rows, start = pipeline.stats["packed"], 0, time.perf_counter()
    while pipeline.stats["packed"] - start_samples < samples:
        next(pipeline)
        rows += 4
    seconds = time.perf_counter() - start
    return {"samples/s": (pipeline.stats["packed"] - start_samples) / seconds, "rows/s": rows / seconds}


def bench_cauldron_reference(path: Path, tokenizer_path: Path, samples: int, workers: int) -> dict:
    import datasets
    import torch
    from transformers import Idefics2Processor, LlamaTokenizer
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from idefics_jax.data.processor import HF_CHAT_TEMPLATE

    tokenizer = LlamaTokenizer(vocab_file=str(tokenizer_path), add_bos_token=True, legacy=False)
    tokenizer.pad_token = "<unk>"
    processor = Idefics2Processor(image_processor=Idefics2ImageProcessorPil(do_image_splitting=False),
                                  tokenizer=tokenizer, image_seq_len=64, chat_template=HF_CHAT_TEMPLATE)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")

    def collate(examples):
        texts, images = [], []
        for example in examples:
            messages = []
            for i, turn in enumerate(example["texts"]):
                opening = [{"type": "image"}] * len(example["images"]) if i == 0 else []
                messages += [{"role": "user", "content": opening + [{"type": "text", "text": turn["user"]}]},
                             {"role": "assistant", "content": [{"type": "text", "text": turn["assistant"]}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=False))
            images.append(example["images"])
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        labels[labels == image_token] = -100
        batch["labels"] = labels
        return batch

    dataset = datasets.Dataset.from_parquet(str(path)).shuffle(seed=0)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=workers,
                                              persistent_workers=workers > 0))
    for _ in range(max(2, workers)):
        next(loader)
    start, done = time.perf_counter(), 0
    while done < samples:
        done += len(next(loader)["input_ids"])
    return {"samples/s": done / (time.perf_counter() - start)}


def bench_cauldron(rows: int, lines: list[str]) -> None:
    from idefics_jax.data.synthetic import generate

    directory = Path(tempfile.mkdtemp())
    generate(directory / "synthetic", num=100, seed=0, formats=("jsonl",))  # for its tokenizer
    tokenizer_path = directory / "synthetic" / "tokenizer.model"
    path = cauldron_file(directory, rows)
    samples = rows // 2
    lines += ["", f"The Cauldron's Parquet rows ({rows} rows, 1 JPEG of 200-1000 px and 1-3 Q/A turns each, "
              f"{samples} samples timed after warm-up):", "",
              "| workers | ours: samples/s | ours: packed rows/s (2048 tokens) | datasets + transformers + collator: "
              "samples/s | speed-up (samples/s) |", "|---|---|---|---|---|"]
    for workers in (0, 2):
        ours = bench_cauldron_ours(path, tokenizer_path, samples, workers)
        theirs = bench_cauldron_reference(path, tokenizer_path, samples, workers)
        lines.append(f"| {workers} | {ours['samples/s']:.1f} | {ours['rows/s']:.2f} | {theirs['samples/s']:.1f} | "
                     f"{ours['samples/s'] / theirs['samples/s']:.2f}x |")
        print(lines[-1], flush=True)


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
    parser.add_argument("--parts", default="processors,pipeline,cauldron")
    parser.add_argument("--cauldron-rows", type=int, default=400)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    parts = args.parts.split(",")
    lines = [f"\n## Preprocessing ({datetime.date.today()})\n", f"Machine: {machine()}.\n",
             f"Command: `python benchmarks/preprocess.py --images {args.images} --parts {args.parts} "
             f"--cauldron-rows {args.cauldron_rows}` "
             "(same decoded images for both processors, one image per call, each side's whole call: resize, "
             "normalise, split, pad, pixel mask, stacked numpy batch; ours `ImageProcessor.__call__`, theirs "
             "`Idefics2ImageProcessorPil.__call__(return_tensors='np')`; the Cauldron rows as the module's doc says).\n"]
    if "processors" in parts:
        images = make_images(args.images)
        lines += ["| processor | splitting | ours (images/s) | transformers (images/s) | speed-up |",
                  "|---|---|---|---|---|"]
        for split in (False, True):
            r = bench_processors(images, split)
            lines.append(f"| Idefics2ImageProcessor | {'yes' if split else 'no'} | {r['ours']:.1f} | "
                         f"{r['reference']:.1f} | {r['ours'] / r['reference']:.2f}x |")
            print(lines[-1], flush=True)
    if "pipeline" in parts:
        lines += ["", "| pipeline (synthetic mix, seq 2048, 8 image slots, 384 px) | packed rows/s |", "|---|---|"]
        for workers in (0, 2):
            lines.append(f"| {workers} worker processes | {bench_pipeline(workers):.1f} |")
            print(lines[-1], flush=True)
    if "cauldron" in parts:
        bench_cauldron(args.cauldron_rows, lines)
    append_results(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
