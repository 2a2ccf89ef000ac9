"""A TensorFlow Datasets builder for records in our jsonl format (TensorFlow not needed).

Each example is one feature, `entry`: the msgpack bytes `{"record": json, "images": {ref: bytes}}`
(the ArrayRecord entry format), stored as a TFDS `Tensor(shape=(), dtype=object)`; TFDS's `Image`
feature would need TensorFlow to encode. Files are written as ArrayRecord, so
`builder.as_data_source()` gives the random access Grain reads.

    build("synthetic/pairs", "tfds/pairs")          # jsonl + images -> TFDS build
    source = TfdsSource("tfds/pairs")                 # idefics_jax.data.sources
"""

from __future__ import annotations

import functools
import os

import numpy as np

from idefics_jax.data.sources import JsonlSource, encode_entry, records_with_images


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds  # heavy, and needed only for TFDS builds

    class IdeficsRecords(tfds.core.GeneratorBasedBuilder):
        """Idefics2 training records (pairs, documents, interleaved documents, conversations)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Records with embedded encoded images."}
        disable_shuffling = True  # keep the records' order: the pipeline shuffles with its own seed

        def __init__(self, *, source_dir: str | None = None, **kwargs):
            self._source_dir = source_dir
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description="Idefics2 records; `entry` is msgpack {record: json, images: {ref: bytes}}.",
                features=tfds.features.FeaturesDict({"entry": tfds.features.Tensor(shape=(), dtype=np.object_)}),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            source = JsonlSource(self._source_dir)
            records = (source[i] for i in range(len(source)))
            for i, (record, images) in enumerate(records_with_images(records, source.base_dir)):
                yield i, {"entry": encode_entry(record, images)}

    return IdeficsRecords


def build(source_dir: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """Prepares the TFDS build of `source_dir` (jsonl + images) under `data_dir`."""
    import tensorflow_datasets as tfds  # heavy, and needed only for TFDS builds

    builder = _builder_class()(source_dir=str(source_dir), data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir
