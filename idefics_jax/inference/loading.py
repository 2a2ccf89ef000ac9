"""Everything generation and evaluation need from a directory: model config, parameters,
tokenizer and image-processing settings.

Three kinds of directory are understood:
- a Hugging Face Idefics2 directory (`config.json` + safetensors, with `tokenizer.model` and
  `preprocessor_config.json` when the processor was saved beside it);
- an idefics_jax checkpoint (`config.json` + orbax `params/`, from `python -m idefics_jax.convert`);
- a training workdir (`config.json` of the training run + `checkpoints/`): its latest readable
  step, LoRA/DoRA adapters merged, with the tokenizer the run saved beside them and the image
  sizes of its data config.
Each may be a local path or a gs://bucket/... URL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from etils import epath

from idefics_jax.config import Idefics2Config
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.image_tokens import IMAGE_TOKEN
from idefics_jax.data.tokenizer import Tokenizer
from idefics_jax.paths import as_path


@dataclasses.dataclass
class LoadedModel:
    config: Idefics2Config
    params: Any
    tokenizer: Tokenizer
    image_processor: ImageProcessor
    description: str  # what was loaded, for logs


def checkpoint_kind(path: Path) -> str:
    """'hf', 'idefics_jax' or 'workdir'; a clear error for anything else."""
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist")
    if (path / "checkpoints").is_dir() and (path / "config.json").exists():
        return "workdir"
    if (path / "params").is_dir() and (path / "config.json").exists():
        return "idefics_jax"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return "hf"
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected a Hugging Face directory (config.json + *.safetensors), an "
        f"idefics_jax checkpoint (config.json + params/) or a training workdir (config.json + checkpoints/)")


def image_processor_from(directory: Path) -> ImageProcessor:
    """Reads Hugging Face's `preprocessor_config.json` when there is one; the Idefics2 defaults otherwise."""
    path = directory / "preprocessor_config.json"
    if not path.exists():
        return ImageProcessor()
    settings = json.loads(path.read_text())
    size = settings.get("size") or {}
    mean, std = settings.get("image_mean", [0.5]), settings.get("image_std", [0.5])
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise ValueError(f"{path}: per-channel image_mean / image_std are not supported ({mean}, {std})")
    return ImageProcessor(longest_edge=size.get("longest_edge", 980), shortest_edge=size.get("shortest_edge", 378),
                          do_image_splitting=settings.get("do_image_splitting", False), image_mean=mean[0],
                          image_std=std[0], rescale_factor=settings.get("rescale_factor", 1 / 255))


def save_image_processor(directory: Path, images: ImageProcessor):
    """Writes `images` as Hugging Face's `preprocessor_config.json` (what `image_processor_from` reads,
    and transformers' Idefics2ImageProcessor)."""
    settings = {"image_processor_type": "Idefics2ImageProcessor", "do_convert_rgb": True, "do_resize": True,
                "size": {"longest_edge": images.longest_edge, "shortest_edge": images.shortest_edge},
                "resample": 2, "do_rescale": True, "rescale_factor": images.rescale_factor, "do_normalize": True,
                "image_mean": [images.image_mean] * 3, "image_std": [images.image_std] * 3, "do_pad": True,
                "do_image_splitting": images.do_image_splitting}
    (directory / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def training_image_processor(config) -> ImageProcessor:
    """The image sizes a training config's (first) source was processed at."""
    source = config.data.sources[0] if config.data.sources else {}
    return ImageProcessor(longest_edge=source.get("longest_edge", 980), shortest_edge=source.get("shortest_edge", 378))


def _load_workdir(path: Path):
    import ml_collections

    from idefics_jax.train.loop import restore_latest

    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    mcfg, params, step = restore_latest(config, path)
    tokenizer = path / "tokenizer.model"  # saved by the run; workdirs of older runs: where the run read it
    if not tokenizer.exists():
        data_dir = epath.Path(config.data.dir) if config.data.dir else path / "data"
        tokenizer = epath.Path(config.data.tokenizer) if config.data.tokenizer else data_dir / "tokenizer.model"
    return mcfg, params, tokenizer, training_image_processor(config), f"training workdir {path} at step {step}"


def load_for_inference(path: str | Path, *, tokenizer: str | Path | None = None, mesh=None,
                       dtype=None) -> LoadedModel:
    """Loads the model and processor settings of `path` (see the module docstring) onto the device,
    or with a `mesh` straight into the shards `Generator` places them in (each process reads only
    what its devices hold), so that a model that fits the mesh but not one device loads.
    dtype: the parameters' dtype (None: as stored; bfloat16 halves a float32 checkpoint's memory)."""
    import jax

    from idefics_jax.convert import load_checkpoint, load_hf_checkpoint
    from idefics_jax.models.idefics2 import Idefics2
    from idefics_jax.sharding import param_shardings

    path = as_path(path, "Checkpoint")
    kind = checkpoint_kind(path)
    if kind == "workdir":
        config, params, default_tokenizer, images, description = _load_workdir(path)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
    else:
        config = Idefics2Config.from_json_file(path / "config.json")
        shardings = None if mesh is None else param_shardings(Idefics2(config), mesh)
        config, params = (load_hf_checkpoint if kind == "hf" else load_checkpoint)(path, shardings=shardings,
                                                                                    dtype=dtype)
        default_tokenizer, images = path / "tokenizer.model", image_processor_from(path)
        description = f"{'Hugging Face' if kind == 'hf' else 'idefics_jax'} checkpoint {path}"
    tokenizer_path = as_path(tokenizer, "--tokenizer") if tokenizer else default_tokenizer
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"No tokenizer: {tokenizer_path} does not exist (pass --tokenizer PATH, a "
                                f"sentencepiece .model)")
    tok = Tokenizer(tokenizer_path)
    if tok.token_id(IMAGE_TOKEN) != config.image_token_id:
        raise ValueError(f"The tokenizer {tokenizer_path} gives {IMAGE_TOKEN} the id {tok.token_id(IMAGE_TOKEN)} but "
                         f"the model expects {config.image_token_id}: they were not made for each other")
    if tok.vocab_size > config.text.vocab_size:
        raise ValueError(f"The tokenizer {tokenizer_path} has {tok.vocab_size} tokens, more than the model's "
                         f"vocabulary of {config.text.vocab_size}")
    return LoadedModel(config, params, tok, images, description)
