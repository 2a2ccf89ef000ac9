"""The Grain input pipeline: sources -> encoded samples -> mixture -> packed rows -> batches.

    pipeline = Pipeline(sources, tokenizer, PackConfig(seq_len=2048, image_slots=8, buckets=...),
                        batch_size=8, image_seq_len=64, seed=0)
    for batch in pipeline:        # numpy dicts, see packing.py for the keys
        ...
    state = pipeline.get_state()  # JSON-serialisable; Pipeline(...).set_state(state) resumes exactly

`tile` (Idefics3, SmolVLM: the vision tower's image size) cuts images into tiles as their processor
does, one tile per image slot; `chat_format` writes conversations (`data.processor.CHAT_FORMATS`).

Per source: its records are split across hosts (`shard_index` / `shard_count`, by default
`jax.process_index()` / `jax.process_count()`), shuffled (a new order every epoch), repeated,
and encoded (images decoded and resized, prompt tokenized) by `SampleEncoder`. The sources are
mixed by weight, packed into rows and batched. With `num_workers > 0` all of that runs in worker
processes (each on a slice of every source); the output order stays deterministic for a seed.

A record that cannot be encoded (corrupt image, missing file, `<image>` count mismatch, ...) is
skipped, logged and counted (`pipeline.stats`, `pipeline.summary()`); `strict=True` raises instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags

from idefics_jax.data.image_processing import IMAGE_SIZINGS, MAX_IMAGE_PIXELS, ImageProcessor
from idefics_jax.data.packing import PackConfig, PackIterDataset, collate, finalize, skipped
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.processor import make_processor
from idefics_jax.data.samples import SampleEncoder, SampleError, record_place
from idefics_jax.data.schemas import MISSING_IMAGES
from idefics_jax.data.sources import FORMATS, open_source
from idefics_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str
    format: str = "jsonl"
    schema: str = ""  # parquet / arrow rows: the_cauldron, docmatix, obelics, pairs or records ("": told from the columns)
    image_column: str = ""  # pairs: the image and caption columns ("": the usual names, see data/schemas.py)
    text_column: str = ""
    dpi: int = 150  # pdfa: pages rendered at this resolution
    image_store: str = ""  # obelics: the downloaded images (img2dataset output, ...; see data/image_store.py)
    missing_images: str = "skip"  # obelics, an image not in the store: "skip" the document or "drop" the image
    weight: float = 1.0
    max_length: int = 2048  # samples with more tokens are dropped (counted), never truncated
    longest_edge: int = 980
    shortest_edge: int = 378
    split_probability: float = 0.0  # fraction of samples whose images are split into 4 crops + whole
    image_sizing: str = "keep_aspect"  # or "square": every image resized to longest_edge x longest_edge
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a record with a larger image is skipped (counted), never decoded

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"Source '{self.name}': unknown format '{self.format}'; choose one of {FORMATS}")
        if self.weight <= 0:
            raise ValueError(f"Source '{self.name}': weight must be positive, got {self.weight}")
        if not 0 <= self.split_probability <= 1:
            raise ValueError(f"Source '{self.name}': split_probability must be in [0, 1]")
        if self.image_sizing not in IMAGE_SIZINGS:
            raise ValueError(f"Source '{self.name}': image_sizing must be one of {IMAGE_SIZINGS}, "
                             f"not '{self.image_sizing}'")
        if self.missing_images not in MISSING_IMAGES:
            raise ValueError(f"Source '{self.name}': missing_images must be one of {MISSING_IMAGES}, "
                             f"not '{self.missing_images}'")
        if self.max_image_pixels <= 0:
            raise ValueError(f"Source '{self.name}': max_image_pixels must be positive, got {self.max_image_pixels}")

    def image_processor(self, tile: int = 0) -> ImageProcessor | TileImageProcessor:
        """The image processing of this source's settings: Idefics2's, or with `tile` (`config.tile_side`)
        Idefics3's / SmolVLM's tiles of that side (`longest_edge` is then the whole image's)."""
        if not tile:
            return ImageProcessor(longest_edge=self.longest_edge, shortest_edge=self.shortest_edge,
                                  max_pixels=self.max_image_pixels, image_sizing=self.image_sizing)
        if self.image_sizing != "keep_aspect":
            raise ValueError(f"Source '{self.name}': image_sizing={self.image_sizing!r} is Idefics2's processing; "
                             f"tiled images (Idefics3, SmolVLM) keep the aspect ratio")
        return TileImageProcessor(longest_edge=self.longest_edge, tile=tile, max_pixels=self.max_image_pixels)


class EncodeRecord:
    """record -> encoded sample (or a `skipped` marker); picklable for worker processes.

    tile: 0 for Idefics2's image processing, else the side of Idefics3's / SmolVLM's tiles
    (`SourceConfig.image_processor`)."""

    def __init__(self, source: SourceConfig, base_dir: str, tokenizer: Tokenizer, image_seq_len: int,
                 seed: int, strict: bool, tile: int = 0, chat_format: str = "idefics2"):
        self.source, self.strict, self.seed = source, strict, seed
        processor = make_processor(tokenizer, source.image_processor(tile), image_seq_len, chat_format)
        self.encoders = {split: SampleEncoder(processor.with_splitting(split), base_dir=base_dir,
                                              max_length=source.max_length, source=source.name)
                         for split in (False, True)}

    def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, Any]:
        split = bool(rng.random() < self.source.split_probability)
        where = record_place(record)
        try:
            return self.encoders[split](record)
        except SampleError as error:
            if self.strict:
                raise SampleError(error.reason, f"source '{self.source.name}', sample {where}: {error}") from error
            return skipped(error.reason, f"{self.source.name}/{where}", str(error))


def build_dataset(sources: Sequence[SourceConfig], tokenizer: Tokenizer, pack: PackConfig, batch_size: int, *,
                  image_seq_len: int = 64, tile: int = 0, chat_format: str = "idefics2", seed: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None, num_workers: int = 0,
                  strict: bool = False, repeat: bool = True, read_threads: int = 16,
                  read_buffer: int = 500) -> grain.IterDataset:
    if not sources:
        raise ValueError("The pipeline needs at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Source names must be unique, got {names}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    streams = {}
    for k, source in enumerate(sources):
        reader = open_source(source.path, source.format, schema=source.schema, image_column=source.image_column,
                             text_column=source.text_column, dpi=source.dpi, image_store=source.image_store,
                             missing_images=source.missing_images)
        ds = grain.MapDataset.source(reader)
        if len(ds) < shard_count:
            raise ValueError(f"Source '{source.name}' has {len(ds)} records, fewer than {shard_count} hosts")
        ds = ds[shard_index::shard_count].shuffle(seed=seed + 1000 * k)
        if repeat:
            ds = ds.repeat()
        encode = EncodeRecord(source, reader.base_dir, tokenizer, image_seq_len, seed, strict, tile, chat_format)
        ds = ds.random_map(encode, seed=seed + 1000 * k + 1)
        # each source reads and encodes records in `read_threads` threads, `read_buffer` ahead (grain's
        # defaults 16 / 500 suit big hosts; on a 2-core machine 1 / 8 is faster: the work holds the GIL)
        read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer)
        streams[source.name] = ds.to_iter_dataset(read)
    weights = {s.name: s.weight for s in sources}
    mixed = grain.IterDataset.mix(streams, weights) if len(streams) > 1 else next(iter(streams.values()))
    packed = PackIterDataset(mixed, pack)
    batched = packed.batch(batch_size, batch_fn=functools.partial(collate, config=pack))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batched.map(finalize)


class Pipeline:
    """An iterator of packed batches with resumable state and a count of skipped samples."""

    def __init__(self, sources: Sequence[SourceConfig], tokenizer: Tokenizer, pack: PackConfig, batch_size: int,
                 **kwargs):
        self.dataset = build_dataset(sources, tokenizer, pack, batch_size, **kwargs)
        self._iterator = iter(self.dataset)
        self.stats: Counter = Counter()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        self.stats.update(batch["stats"])
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), "stats": dict(self.stats)}

    def set_state(self, state: dict[str, Any]):
        self._iterator.set_state(state["grain"])
        self.stats = Counter(state.get("stats", {}))

    def save_state(self, path):
        with open(path, "w") as f:
            json.dump(self.get_state(), f)

    def load_state(self, path):
        with open(path) as f:
            self.set_state(json.load(f))

    def summary(self) -> str:
        problems = {k: v for k, v in sorted(self.stats.items()) if k.startswith(("skipped/", "dropped/"))}
        text = f"{self.stats.get('packed', 0)} samples packed"
        if problems:
            text += "; " + ", ".join(f"{k}: {v}" for k, v in problems.items())
        return text
