"""The paper's data mixtures, as source lists for the pipeline (paths are yours).

Pre-training stage 1 (images up to 384 px): 70% interleaved web documents (OBELICS), 30%
image-text pairs, sequences of 2048 / 1536 tokens. Stage 2 (up to 980 px) adds PDF pages:
45% documents, 35% pairs, 20% PDFs, 2048 / 1536 / 1024 tokens.
"""

from __future__ import annotations

from idefics_jax.data.pipeline import SourceConfig


def stage1(interleaved: str, pairs: str, fmt: str = "array_record") -> list[SourceConfig]:
    edges = dict(longest_edge=384, shortest_edge=378)
    return [SourceConfig("interleaved", interleaved, fmt, weight=0.7, max_length=2048, **edges),
            SourceConfig("pairs", pairs, fmt, weight=0.3, max_length=1536, **edges)]


def stage2(interleaved: str, pairs: str, pdfs: str, fmt: str = "array_record") -> list[SourceConfig]:
    edges = dict(longest_edge=980, shortest_edge=378)
    return [SourceConfig("interleaved", interleaved, fmt, weight=0.45, max_length=2048, **edges),
            SourceConfig("pairs", pairs, fmt, weight=0.35, max_length=1536, **edges),
            SourceConfig("pdfs", pdfs, fmt, weight=0.20, max_length=1024, **edges)]
