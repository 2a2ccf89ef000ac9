"""A training run's data: the data directory (synthetic data generated on first use), the
tokenizer, the Grain pipeline a config describes, and host batches placed as global arrays."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
from etils import epath

from idefics_jax.config import tile_side
from idefics_jax.data.json_tokenizer import JsonTokenizer, open_tokenizer, tokenizer_path
from idefics_jax.data.packing import PackConfig
from idefics_jax.data.pipeline import Pipeline, SourceConfig
from idefics_jax.data.synthetic import generate
from idefics_jax.data.tokenizer import Tokenizer
from idefics_jax.paths import as_path, is_url
from idefics_jax.sharding import batch_sharding
from idefics_jax.train.step import MODEL_KEYS

log = logging.getLogger(__name__)


def synthetic_tokenizer(config) -> str:
    """The kind of tokenizer synthetic data is made with: a tokenizer.json for Idefics3 / SmolVLM
    models (their kind), Idefics2's sentencepiece model otherwise."""
    return "json" if tile_side(config.model) else "sentencepiece"


def synthetic_data_dir(config, workdir: epath.Path) -> Path:
    """Where generated synthetic data lives: WORKDIR/data, or for a gs:// workdir a local directory
    named by what was generated (the pipeline reads a disk; every host makes the same copy)."""
    if not is_url(workdir):
        return Path(workdir) / "data"
    d = config.data
    return Path(tempfile.gettempdir()) / "idefics_jax_data" / \
        f"synthetic-{d.synthetic_num}-{d.seed}-{int(d.synthetic_easy)}-{synthetic_tokenizer(config)}"


def prepare_data(config, workdir: epath.Path) -> tuple[epath.Path, Tokenizer | JsonTokenizer]:
    """(the data directory, the tokenizer): `config.data.dir` (a local path or gs://bucket/...), or
    synthetic data, generated on first use. The tokenizer: `config.data.tokenizer`, else the data
    directory's (`tokenizer.model` or `tokenizer.json`), else `config.model.init_from`'s."""
    data_dir = as_path(config.data.dir, "config.data.dir") if config.data.dir else \
        epath.Path(synthetic_data_dir(config, workdir))
    kind = synthetic_tokenizer(config)
    made = data_dir / ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")
    if config.data.synthetic and not made.exists():
        if is_url(data_dir):
            raise ValueError(f"config.data.dir={config.data.dir} holds no {made.name}, and synthetic data is "
                             f"generated on local disk: name a local config.data.dir, or leave it empty")
        # every host writes its own copy (the same for a seed), then renames it into place
        log.info("Generating synthetic data in %s", data_dir)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = data_dir.with_name(f"{data_dir.name}.tmp-{jax.process_index()}-{os.getpid()}")
        generate(tmp, num=config.data.synthetic_num, seed=config.data.seed, formats=("jsonl",),
                 easy=config.data.synthetic_easy, tokenizer=kind)
        try:
            os.replace(tmp, data_dir)
        except OSError:  # another host (shared disk) was first
            shutil.rmtree(tmp, ignore_errors=True)
    if config.data.tokenizer:
        path = as_path(config.data.tokenizer, "config.data.tokenizer")
    elif config.data.synthetic:
        path = made
    else:  # the data's own, else the one of the checkpoint the run starts from
        path = tokenizer_path(data_dir)
        if not path.exists() and config.model.init_from:
            path = tokenizer_path(as_path(config.model.init_from, "config.model.init_from"))
    if not path.exists():
        raise FileNotFoundError(f"Tokenizer {path} not found (config.data.tokenizer: a sentencepiece .model or a "
                                f"tokenizer.json)")
    return data_dir, open_tokenizer(path)


def make_pipeline(config, data_dir: epath.Path, tokenizer: Tokenizer, image_seq_len: int) -> Pipeline:
    if not config.data.sources:
        raise ValueError("config.data.sources is empty: name at least one source")
    known = {f.name for f in dataclasses.fields(SourceConfig)} - {"name"}
    sources = []
    for name, source in config.data.sources.items():
        source = dict(source)
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"config.data.sources.{name} has unknown key(s) {unknown}; known: {sorted(known)}")
        if "path" not in source:
            raise ValueError(f"config.data.sources.{name} has no path")
        source["name"], source["path"] = name, str(data_dir / source["path"])
        source.setdefault("image_sizing", config.data.image_sizing)
        if source.get("image_store"):
            source["image_store"] = str(data_dir / source["image_store"])
        sources.append(SourceConfig(**source))
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                         f"{jax.process_count()} hosts")
    pack = PackConfig(seq_len=config.data.seq_len, image_slots=config.data.image_slots,
                      buckets=tuple(tuple(b) for b in config.data.buckets), pad_id=tokenizer.pad_id)
    return Pipeline(sources, tokenizer, pack, config.data.batch_size // jax.process_count(),
                    image_seq_len=image_seq_len, tile=tile_side(config.model),
                    chat_format=config.model.model_type, seed=config.data.seed, num_workers=config.data.num_workers,
                    strict=config.data.strict,
                    read_threads=config.data.read_threads, read_buffer=config.data.read_buffer)


def global_batch(batch: dict, mesh) -> dict:
    """This host's rows -> global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, batch[k].ndim), batch[k])
            for k in MODEL_KEYS}
