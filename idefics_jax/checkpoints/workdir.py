"""A training workdir read for its model: `WORKDIR/config.json` (the run's training config) and the
parameters of its latest readable checkpoint, LoRA / DoRA adapters merged, layers unstacked. No
optimizer is built and no optimizer state is read. Any host or pod reads any run's workdir, local
or gs://, whatever mesh and slices the run trained on.

    config, params, step = restore_workdir("runs/tiny")
    export_hf("runs/tiny", "hf_out/")          # + the run's tokenizer and image sizes
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from etils import epath

from idefics_jax.checkpoints.hf import save_hf_checkpoint
from idefics_jax.checkpoints.processor import copy_processor_files, save_image_processor, training_image_processor
from idefics_jax.checkpoints.train_state import restore_params
from idefics_jax.data.json_tokenizer import tokenizer_path
from idefics_jax.config import Idefics2Config, model_config
from idefics_jax.models.lora import LoraConfig, merge
from idefics_jax.models.scan import unstack_layers
from idefics_jax.paths import as_path


CHECKPOINTS = "checkpoints"  # WORKDIR/checkpoints: the run's orbax steps (`train_state.Checkpointer`)


def checkpoint_directory(workdir: epath.Path) -> epath.Path:
    return workdir / CHECKPOINTS


def write_run_files(workdir: epath.Path, config: ml_collections.ConfigDict, tokenizer):
    """What reading the workdir needs beside its checkpoints, on any machine: the training config
    (`config.json`) and the run's tokenizer (`tokenizer.model`, or `tokenizer.json` and its
    `tokenizer_config.json`)."""
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    for name, data in tokenizer.files().items():
        (workdir / name).write_bytes(data)


def training_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a run saved in `WORKDIR/config.json`."""
    path = as_path(workdir, "Workdir") / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path.parent} is not a training workdir: config.json is missing")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


# What trains, by name (`config.train.regime`; the paper's comparison): "frozen" (the backbones
# frozen, the new parameters, the connector, trained), "lora" (adapters on both backbones, of
# train.lora's rank, 16 when it is 0, and alpha; the connector trained fully), "full" (everything);
# "" leaves it to train.freeze and train.lora.
REGIMES = ("", "frozen", "lora", "full")
BACKBONES = ("vision", "text")
DEFAULT_LORA_RANK = 16


def regime_of(config: ml_collections.ConfigDict) -> str:
    """`config.train.regime`, checked against the keys it sets."""
    regime = config.train.get("regime", "")
    if regime not in REGIMES:
        raise ValueError(f"config.train.regime '{regime}' is not one of {REGIMES[1:]} (or '' for train.freeze / "
                         f"train.lora as set)")
    if regime and list(config.train.freeze):
        raise ValueError(f"config.train.regime={regime} decides what is frozen; leave train.freeze empty "
                         f"(it is {list(config.train.freeze)})")
    if regime in ("frozen", "full") and config.train.lora.rank:
        raise ValueError(f"config.train.regime={regime} trains no adapters; train.lora.rank is {config.train.lora.rank}")
    return regime


def frozen_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The towers a training config keeps frozen (beyond those its adapters cover)."""
    regime = regime_of(config)
    return BACKBONES if regime == "frozen" else () if regime else tuple(config.train.freeze)


def lora_of(config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The adapters a training config trains (None when it trains none)."""
    section, regime = config.train.lora, regime_of(config)
    if regime in ("frozen", "full"):
        return None
    lora = LoraConfig(rank=section.rank or (DEFAULT_LORA_RANK if regime == "lora" else 0), alpha=section.alpha,
                      dora=section.dora, targets=section.targets,
                      towers=BACKBONES if regime == "lora" else tuple(section.towers))
    return lora if lora.enabled else None


def restore_workdir(workdir: str | os.PathLike, step: int | None = None,
                    config: ml_collections.ConfigDict | None = None) -> tuple[Idefics2Config, dict, int]:
    """(model config, model parameters with the adapters merged and layers unstacked, step) of
    WORKDIR's checkpoint `step` (default: the latest readable one). config: the run's training
    config when the caller has read it already (default: read from the workdir)."""
    workdir = as_path(workdir, "Workdir")
    config = training_config(workdir) if config is None else config
    step, params = restore_params(checkpoint_directory(workdir), step)
    lora = lora_of(config)
    return model_config(config.model), unstack_layers(merge(params, lora) if lora else params), step


def tokenizer_of(workdir: epath.Path, config: ml_collections.ConfigDict) -> epath.Path:
    """The tokenizer a run saved beside its checkpoints (workdirs of older runs: where the run read it)."""
    tokenizer = tokenizer_path(workdir)
    if not tokenizer.exists():
        data_dir = epath.Path(config.data.dir) if config.data.dir else workdir / "data"
        tokenizer = epath.Path(config.data.tokenizer) if config.data.tokenizer else tokenizer_path(data_dir)
    return tokenizer


def export_hf(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Writes WORKDIR's latest checkpoint (adapters merged) as a Hugging Face directory (local or
    gs://), with the run's tokenizer and its image sizes (`preprocessor_config.json`), which
    `generate`, `evaluate` and `config.model.init_from` read. Every process of a multi-host run
    calls it (each tensor is gathered from the hosts holding it; process 0 writes). Returns the step."""
    workdir = as_path(workdir, "Workdir")
    run = training_config(workdir)
    mcfg, params, step = restore_workdir(workdir, config=run)
    out = as_path(out_dir, "--export_hf")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        copy_processor_files(workdir, out)  # the tokenizer the run saved
        save_image_processor(out, training_image_processor(run), run.model.model_type)
    save_hf_checkpoint(out, mcfg, params, progress=True)  # returns on every process once complete
    return step
