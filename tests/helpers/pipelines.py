"""A small Grain pipeline over the synthetic data, for the pipeline tests."""

from __future__ import annotations

from idefics_jax.data.packing import PackConfig
from idefics_jax.data.pipeline import Pipeline, SourceConfig
from idefics_jax.data.tokenizer import Tokenizer

SEQ_LATENTS = 8  # image_seq_len of the test pipelines
EDGE = dict(longest_edge=56, shortest_edge=28)


def make_pipeline(synthetic, names=("pairs", "documents", "interleaved", "conversations"), fmt="jsonl", **kwargs):
    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    base = synthetic if fmt == "jsonl" else synthetic / fmt
    sizing = kwargs.pop("image_sizing", "keep_aspect")
    sources = [SourceConfig(n, str(base / n), format=fmt, max_length=kwargs.pop(f"max_length_{n}", 2048),
                            split_probability=0.5 if n == "conversations" else 0.0, image_sizing=sizing, **EDGE)
               for n in names]
    pack = kwargs.pop("pack", PackConfig(seq_len=400, image_slots=8, buckets=((28, 56), (56, 56))))
    defaults = dict(image_seq_len=SEQ_LATENTS, seed=1, shard_index=0, shard_count=1)
    return Pipeline(sources, tokenizer, pack, kwargs.pop("batch_size", 3), **{**defaults, **kwargs}), tokenizer
