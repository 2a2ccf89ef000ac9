"""Dataset preparation: check a source, convert it to ArrayRecord shards or a TFDS build.

    python data/prepare.py check PATH [--tokenizer tokenizer.model] [--tile 512]  # encode every record, report problems
        [--format jsonl|array_record|parquet|arrow|webdataset]
        [--schema the_cauldron|docmatix|obelics|pairs|pdfa|records]
        [--image-column C --text-column C] [--image-store STORE --missing-images skip|drop]
    python data/prepare.py array_record DIR OUT_DIR [--shards 8]    # jsonl + image files -> ArrayRecord
    python data/prepare.py array_record PATH OUT_DIR [--workers 8]  # Parquet / Arrow / tar -> ArrayRecord
    python data/prepare.py tfds DIR OUT_DIR                         # jsonl + image files -> TFDS build
    python data/prepare.py images STORE                             # index downloaded images by URL

DIR holds `data.jsonl` and the image files it names (the format of `idefics_jax/data/samples.py`;
`python -m idefics_jax.data.synthetic OUT` writes such directories). `check` reads any source: a
directory or file of our records, or a published dataset as downloaded (Parquet or Arrow files of
The Cauldron, Docmatix, OBELICS, image-caption pairs; PDFA's WebDataset tar shards), its format told
from the files and its schema from the columns unless given. OBELICS's images come from the store
the user downloaded (`--image-store`: img2dataset's output, or Parquet / ArrayRecord files of url ->
bytes, see `idefics_jax/data/image_store.py`); `images STORE` indexes it once (else the first
reader does) and prints what it holds. DIR and OUT_DIR may be gs://bucket/... URLs: OUT_DIR's
files are written to local disk first, then uploaded (a published dataset's shards each as it is
complete, so that a conversion into a bucket resumes too).
"""

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections import Counter

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm.auto import tqdm

from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.image_store import ImageStore
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.json_tokenizer import open_tokenizer
from idefics_jax.data.processor import Processor, TiledProcessor
from idefics_jax.data.samples import SampleEncoder, SampleError, record_place, source_error
from idefics_jax.data.schemas import MISSING_IMAGES, SCHEMAS
from idefics_jax.data.sources import (FORMATS, JsonlSource, encode_entry, file_name, files_at, image_refs,
                                      open_source, record_images, write_array_record)
from idefics_jax.paths import as_path, is_url, local_directory


def source_format(path: str) -> str:
    """The format of the files at `path` (a file, a directory of them, or of directories of them)."""
    path = epath.Path(path)
    levels = [[path]] if not path.is_dir() else [list(path.iterdir())]
    if path.is_dir():  # subsets, each a directory
        levels.append([p for child in levels[0] if child.is_dir() for p in child.iterdir()])
    for files in levels:
        for suffix, fmt in ((".parquet", "parquet"), (".arrow", "arrow"), (".array_record", "array_record"),
                            (".tar", "webdataset"), (".jsonl", "jsonl")):
            if any(f.name.endswith(suffix) for f in files):
                return fmt
    raise FileNotFoundError(f"No data.jsonl, .array_record, .parquet, .arrow or .tar files at {path}")


def describe(sample: dict, record: dict, tokenizer) -> str:
    """One encoded sample as `check` shows it: its place, images, token counts and decoded text (each
    image's run of tokens shortened, at most 400 characters)."""
    text = re.sub(r"(?:<image>)+", lambda m: f"<image>x{m.group(0).count('<image>')}", tokenizer.decode(sample["input_ids"]))
    sizes = ", ".join(f"{image.shape[1]}x{image.shape[0]}" for image in sample["images"]) or "none"
    return (f"{record_place(record)} ({record.get('type')}): images {sizes}; {len(sample['input_ids'])} tokens, "
            f"{int(sample['targets'].sum())} trained\n    {text[:400]!r}")


def record_text(record: dict) -> str:
    """A record's text as `check` shows it without a tokenizer, its images as `<image>`."""
    kind = record.get("type")
    if kind == "conversation":
        return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in record.get("messages") or [])
    if kind == "interleaved":
        return "".join("<image>" if p.get("type") == "image" else str(p.get("text")) for p in record.get("content") or [])
    return "<image>" + str(record.get("text"))


def check(directory: str, tokenizer_path: str | None, image_seq_len: int, max_length: int, fmt: str | None = None,
          samples: int = 3, tile: int = 0, **options) -> int:
    """Reads every record of the source at `directory` (`options`: `open_source`'s keywords) and,
    with a tokenizer, encodes it (images decoded, prompt tokenized; with `tile`, images cut into
    tiles of that side as Idefics3 / SmolVLM do); shows the first `samples` and prints the counts,
    problems by reason; 1 when some record cannot be used."""
    source = open_source(directory, fmt or source_format(directory), **options)
    tokenizer, encoder = open_tokenizer(tokenizer_path) if tokenizer_path else None, None
    if tokenizer:
        processor = (TiledProcessor(tokenizer, TileImageProcessor(4 * tile, tile), image_seq_len, "smolvlm") if tile
                     else Processor(tokenizer, ImageProcessor(), image_seq_len))
        encoder = SampleEncoder(processor, base_dir=source.base_dir, max_length=max_length)
    problems, lengths = Counter(), []
    print(f"{directory}: {source}" + ("" if tokenizer else " (records read; give --tokenizer to encode them)"))
    for i in range(len(source)):
        record = source[i]
        try:
            if encoder is None:
                if error := source_error(record):
                    raise error
                lengths.append(0)
                if len(lengths) <= samples:
                    print(f"sample {i}: {record_place(record)} ({record.get('type')}): "
                          f"{len(image_refs(record))} images\n    {record_text(record)[:400]!r}")
                continue
            sample = encoder(record)
            lengths.append(len(sample["input_ids"]))
            if len(lengths) <= samples:
                print(f"sample {i}: {describe(sample, record, tokenizer)}")
        except SampleError as error:
            problems[error.reason] += 1
            print(f"record {i} ({record_place(record)}): {error.reason}: {error}", file=sys.stderr)
    print(f"{len(source)} records: {len(lengths)} usable, "
          + (", ".join(f"{k} {v}" for k, v in sorted(problems.items())) or "no problems")
          + (f"; tokens per sample: median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}"
             if lengths and tokenizer else ""))
    return 1 if problems else 0


def convert_file(task: tuple) -> dict:
    """One input file (a Parquet or Arrow file, a tar shard) -> `target` (`OUT_DIR/<its name>.array_record`,
    a subset's files `<subset>--<name>.array_record`), written as `.partial` and renamed when complete
    (into a bucket: written locally, then uploaded), then its counts beside it: a file whose counts
    exist is skipped (a killed run resumes, in a bucket too). Returns the counts."""
    file, fmt, options, target = task
    done = epath.Path(target + ".summary.json")
    if done.exists() and epath.Path(target).exists():
        return {**json.loads(done.read_text()), "resumed": 1}
    source = open_source(file, fmt, **options)
    counts, examples = Counter(), []
    with tempfile.TemporaryDirectory(prefix="prepare-") as scratch:
        local = os.path.join(scratch, os.path.basename(target)) if is_url(target) else target
        writer = ArrayRecordWriter(local + ".partial", "group_size:1")
        try:
            for i in range(len(source)):
                record = source[i]
                if error := source_error(record):
                    counts[f"skipped/{error.reason}"] += 1
                    examples.append(f"{record_place(record)}: {error}")
                    continue
                writer.write(encode_entry(record, record_images(record, source.base_dir)))
                counts["kept"] += 1
        finally:
            writer.close()
        os.replace(local + ".partial", local)
        if local != target:
            with open(local, "rb") as src, epath.Path(target).open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    summary = {**counts, "examples": examples[:5]}
    done.write_text(json.dumps(summary))
    return summary


def convert(path: str, out_dir: str, fmt: str, workers: int, **options) -> int:
    """Every input file at `path` converted in parallel (`convert_file`; `options`: `open_source`'s
    keywords); prints the summary."""
    files, base_dir = files_at(path, {"parquet": "parquet", "arrow": "arrow", "webdataset": "tar"}[fmt])
    if options.get("image_store"):
        ImageStore(options["image_store"])  # indexed once here, not by every worker at once
    tasks = [(f, fmt, options, os.path.join(out_dir, file_name(f, base_dir).replace("/", "--") + ".array_record"))
             for f in files]
    totals, examples = Counter(), []
    with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(tasks)))) as pool:
        for summary in tqdm(pool.imap_unordered(convert_file, tasks), total=len(tasks), desc="files", unit="file"):
            examples += summary.pop("examples", [])
            totals.update(summary)
    skipped = {k: v for k, v in totals.items() if k.startswith("skipped/")}
    print(f"{totals['kept']} records kept from {len(files)} files ({totals['resumed']} converted before); "
          + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none skipped"))
    for line in examples[:10]:
        print(f"  skipped {line}", file=sys.stderr)
    return 0


def add_source_options(p: argparse.ArgumentParser):
    p.add_argument("--format", choices=FORMATS, default=None, help="default: told from the files")
    p.add_argument("--schema", choices=SCHEMAS, default="", help="Parquet / Arrow rows (default: told from the columns)")
    p.add_argument("--image-column", default="", help="pairs: the image column (default: image, jpg, png, ...)")
    p.add_argument("--text-column", default="", help="pairs: the caption column (default: caption, text, txt, ...)")
    p.add_argument("--dpi", type=int, default=150, help="pdfa: pages rendered at this resolution")
    p.add_argument("--image-store", default="", help="obelics: the downloaded images (img2dataset output, ...)")
    p.add_argument("--missing-images", choices=MISSING_IMAGES, default="skip",
                   help="obelics, an image not in the store: skip the document, or drop the image")


def source_options(args) -> dict:
    return dict(schema=args.schema, image_column=args.image_column, text_column=args.text_column, dpi=args.dpi,
                image_store=args.image_store, missing_images=args.missing_images)


def images(path: str) -> int:
    """Indexes the image store at `path` (if its index is missing or stale) and prints what it holds."""
    store = ImageStore(path)
    print(f"{path}: {store.layout} store of {len(store.files)} files, {len(store)} images"
          + (f", {store.failed} downloads that failed" if store.failed else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check")
    p.add_argument("dir")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.model or tokenizer.json: encode every sample "
                   "(default: read the records only)")
    p.add_argument("--tile", type=int, default=0, help="cut images into tiles of this side, as Idefics3 (364) and "
                   "SmolVLM (512) do, up to 4 x 4 (default: Idefics2's processing)")
    p.add_argument("--image-seq-len", type=int, default=64)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=3, help="decoded samples shown")
    add_source_options(p)
    p = sub.add_parser("array_record")
    p.add_argument("dir")
    p.add_argument("out_dir")
    p.add_argument("--shards", type=int, default=8, help="jsonl: the output shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="input files converted at once")
    add_source_options(p)
    p = sub.add_parser("tfds")
    p.add_argument("dir")
    p.add_argument("out_dir")
    p = sub.add_parser("images")
    p.add_argument("store")
    args = parser.parse_args(argv)
    try:
        if args.command == "images":
            return images(args.store)
        if args.command == "check":
            return check(args.dir, args.tokenizer, args.image_seq_len, args.max_length, args.format,
                         args.samples, args.tile, **source_options(args))
        if args.command == "array_record" and (args.format or source_format(args.dir)) in ("parquet", "arrow",
                                                                                           "webdataset"):
            if is_url(args.out_dir):
                as_path(args.out_dir, "OUT_DIR")  # the bucket is checked before any work
            else:
                os.makedirs(args.out_dir, exist_ok=True)
            return convert(args.dir, args.out_dir, args.format or source_format(args.dir), args.workers,
                           **source_options(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "array_record":
        source = JsonlSource(args.dir)
        with local_directory(args.out_dir, "OUT_DIR") as out_dir:
            paths = write_array_record(out_dir, (source[i] for i in range(len(source))), source.base_dir,
                                       num_shards=args.shards)
        print(f"Wrote {len(source)} records to {len(paths)} ArrayRecord files in {args.out_dir}")
        return 0
    from idefics_jax.data.tfds_builder import build

    with local_directory(args.out_dir, "OUT_DIR") as out_dir:
        built = build(args.dir, out_dir)
    print(f"Wrote the TFDS build {built.replace(out_dir, args.out_dir.rstrip('/'), 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
