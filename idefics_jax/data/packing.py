"""Packing encoded samples, with their images, into fixed-length rows; batching rows.

A row holds whole samples one after another (greedy, in stream order): a sample goes into the
current row if its tokens and its images still fit (`seq_len` tokens, `image_slots` images),
otherwise the row is emitted and the sample starts the next one. A sample is never cut: an image's
token span always stays whole. A sample that cannot fit even an empty row is dropped and counted.

The packed batch (every stage agrees on this dict):

    input_ids         int32 [batch, seq]      token ids, `pad_id` after the last sample (the model's `input_ids`)
    segment_ids       int32 [batch, seq]      1, 2, ... per sample in the row; 0 = padding
    positions         int32 [batch, seq]      restart at 0 for every sample
    targets           int32 [batch, seq]      the next token of the same sample (0 at its end)
    loss_mask         bool  [batch, seq]      predict `targets[t]` at t (answers only, for chats)
    pixel_values      float32 [batch, slots, height, width, 3]   normalised, zero-padded
    pixel_attention_mask bool [batch, slots, height, width]
    image_segment_ids int32 [batch, slots]    the sample (segment) owning each slot; 0 = empty
    stats             dict[str, int]          samples packed / dropped / skipped, by reason

`height x width` is the smallest of a few static resolution buckets that holds every image of the
batch, so XLA compiles one program per bucket.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Sequence

import grain
import numpy as np

from idefics_jax.data.image_processing import normalize_uint8

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackConfig:
    seq_len: int = 2048
    image_slots: int = 8
    buckets: tuple[tuple[int, int], ...] = ((980, 980),)
    pad_id: int = 0

    def __post_init__(self):
        if not self.buckets:
            raise ValueError("PackConfig.buckets needs at least one (height, width)")
        object.__setattr__(self, "buckets", tuple(sorted((tuple(b) for b in self.buckets), key=lambda b: b[0] * b[1])))


def skipped(reason: str, record_id: str, message: str) -> dict[str, Any]:
    """The stream element standing for a record that could not be encoded."""
    return {"skipped": reason, "id": record_id, "message": message}


def _misfit(sample: dict, config: PackConfig) -> str | None:
    if len(sample["input_ids"]) > config.seq_len:
        return "longer_than_row"
    if len(sample["images"]) > config.image_slots:
        return "more_images_than_slots"
    for image in sample["images"]:
        h, w = image.shape[:2]
        if not any(h <= bh and w <= bw for bh, bw in config.buckets):
            return "image_larger_than_buckets"
    return None


def pack_row(samples: Sequence[dict], config: PackConfig, stats: dict[str, int]) -> dict[str, Any]:
    """Lays out whole samples in one row (they must fit)."""
    seq = config.seq_len
    tokens = np.full(seq, config.pad_id, np.int32)
    segment_ids = np.zeros(seq, np.int32)
    positions = np.zeros(seq, np.int32)
    targets = np.zeros(seq, np.int32)
    loss_mask = np.zeros(seq, bool)
    image_segment_ids = np.zeros(config.image_slots, np.int32)
    images, start = [], 0
    for segment, sample in enumerate(samples, start=1):
        n = len(sample["input_ids"])
        end = start + n
        tokens[start:end] = sample["input_ids"]
        segment_ids[start:end] = segment
        positions[start:end] = np.arange(n)
        targets[start:end - 1] = sample["input_ids"][1:]
        loss_mask[start:end - 1] = sample["targets"][1:]
        image_segment_ids[len(images):len(images) + len(sample["images"])] = segment
        images.extend(sample["images"])
        start = end
    if start > seq or len(images) > config.image_slots:
        raise ValueError("pack_row: samples do not fit the row")
    return {"input_ids": tokens, "segment_ids": segment_ids, "positions": positions, "targets": targets,
            "loss_mask": loss_mask, "images": images, "image_segment_ids": image_segment_ids,
            "stats": dict(stats)}


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: PackConfig):
        super().__init__(parent)
        self._config = config
        self._pending = None  # the sample that did not fit the last row
        self._pending_state = None  # parent state just before that sample was read

    def __next__(self):
        config = self._config
        row, tokens, images = [], 0, 0
        stats: Counter = Counter()
        if self._pending is not None:
            row, tokens, images = [self._pending], len(self._pending["input_ids"]), len(self._pending["images"])
            self._pending = None
        while True:
            state_before = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                if row:
                    break
                raise
            if "skipped" in element:
                stats[f"skipped/{element['skipped']}"] += 1
                log.warning("Skipped sample %s (%s): %s", element["id"], element["skipped"], element["message"])
                continue
            misfit = _misfit(element, config)
            if misfit:
                stats[f"dropped/{misfit}"] += 1
                log.warning("Dropped sample %s: %s", element.get("id"), misfit)
                continue
            n, m = len(element["input_ids"]), len(element["images"])
            if row and (tokens + n > config.seq_len or images + m > config.image_slots):
                self._pending, self._pending_state = element, state_before
                break
            row.append(element)
            tokens, images = tokens + n, images + m
        stats["packed"] += len(row)
        for sample in row:
            stats[f"packed/{sample.get('source') or 'default'}"] += 1
        return pack_row(row, config, stats)

    def get_state(self):
        if self._pending is not None:
            return {"parent": self._pending_state}
        return {"parent": self._parent.get_state()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None


class PackIterDataset(grain.IterDataset):
    """Packs a stream of encoded samples (and `skipped` markers) into rows."""

    def __init__(self, parent: grain.IterDataset, config: PackConfig):
        super().__init__(parent)
        self._config = config

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._config)


def collate(rows: Sequence[dict], config: PackConfig) -> dict[str, Any]:
    """Stacks packed rows and pads their images into the smallest bucket that holds them all."""
    sizes = [image.shape[:2] for row in rows for image in row["images"]]
    need_h = max([h for h, _ in sizes] + [1])
    need_w = max([w for _, w in sizes] + [1])
    height, width = next((b for b in config.buckets if b[0] >= need_h and b[1] >= need_w), config.buckets[-1])
    batch = {key: np.stack([row[key] for row in rows]) for key in
             ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "image_segment_ids")}
    pixels = np.zeros((len(rows), config.image_slots, height, width, 3), np.uint8)
    mask = np.zeros((len(rows), config.image_slots, height, width), bool)
    sizes = np.zeros((len(rows), config.image_slots, 2), np.int32)  # each slot's image (height, width); 0: empty
    for b, row in enumerate(rows):
        for i, image in enumerate(row["images"]):
            h, w = image.shape[:2]
            pixels[b, i, :h, :w] = image
            mask[b, i, :h, :w] = True
            sizes[b, i] = h, w
    # normalised by `finalize`, after worker processes hand the batch over
    batch["pixels_uint8"], batch["image_sizes"] = pixels, sizes
    batch["pixel_attention_mask"] = mask
    stats: Counter = Counter()
    for row in rows:
        stats.update(row["stats"])
    batch["stats"] = dict(stats)
    return batch


def finalize(batch: dict[str, Any]) -> dict[str, Any]:
    """uint8 pixels -> normalised float32 `pixel_values`, zero outside the images.

    Runs in the consuming process: worker processes ship uint8, 4x fewer bytes. Only the images'
    own pixels are normalised (into a zeroed array): padding and empty slots, most of a batch of
    mixed sizes in a large bucket, are never touched."""
    batch = dict(batch)
    pixels, sizes = batch.pop("pixels_uint8"), batch.pop("image_sizes")
    values = np.zeros(pixels.shape, np.float32)
    for b, i in zip(*np.nonzero(sizes[..., 0])):
        h, w = sizes[b, i]
        normalize_uint8(pixels[b, i, :h, :w], out=values[b, i, :h, :w])
    batch["pixel_values"] = values
    return batch
