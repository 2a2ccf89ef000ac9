"""Everything generation and evaluation need from a directory: model config, parameters,
tokenizer and image-processing settings, with `load(path)`.

Three kinds of directory are understood (`checkpoint_kind`):
- a Hugging Face Idefics2, Idefics3 or SmolVLM directory (`config.json` + safetensors, with the
  tokenizer (`tokenizer.model` or `tokenizer.json`), `preprocessor_config.json` and a chat template
  when the processor was saved beside it);
- an idefics_jax checkpoint (`config.json` + orbax `params/`, from `python -m idefics_jax.convert`);
- a training workdir (`config.json` of the training run + `checkpoints/`): its latest readable
  step's parameters, LoRA/DoRA adapters merged, with the tokenizer the run saved beside them and
  the image sizes of its data config.
Each may be a local path or a gs://bucket/... URL.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from idefics_jax.checkpoints.hf import load_hf_checkpoint
from idefics_jax.checkpoints.params import load_checkpoint
from idefics_jax.checkpoints.processor import chat_format_of, image_processor_from, training_image_processor
from idefics_jax.checkpoints.workdir import CHECKPOINTS, restore_workdir, tokenizer_of, training_config
from idefics_jax.config import Idefics2Config
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.json_tokenizer import JsonTokenizer, open_tokenizer, tokenizer_path
from idefics_jax.data.processor import Processor, check_tokenizer, make_processor
from idefics_jax.data.tokenizer import Tokenizer
from idefics_jax.models.idefics2 import Idefics2
from idefics_jax.models.quantize import check_quantize, is_quantized, quantize_params
from idefics_jax.paths import as_path
from idefics_jax.sharding import param_shardings


@dataclasses.dataclass
class LoadedModel:
    config: Idefics2Config
    params: Any
    tokenizer: Tokenizer | JsonTokenizer
    image_processor: ImageProcessor | TileImageProcessor
    description: str  # what was loaded, for logs
    chat_format: str | None = None  # data.processor.CHAT_FORMATS; None: the model type's

    def __post_init__(self):
        self.chat_format = self.chat_format or self.config.model_type

    def processor(self, split: bool | None = None) -> Processor:
        """The model's processor; `split`: images split (crops, tiles) or not (None: as its settings say)."""
        processor = make_processor(self.tokenizer, self.image_processor, self.config.image_seq_len, self.chat_format)
        return processor if split is None else processor.with_splitting(split)


def checkpoint_kind(path: Path) -> str:
    """'hf', 'idefics_jax' or 'workdir'; a clear error for anything else."""
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist")
    if (path / CHECKPOINTS).is_dir() and (path / "config.json").exists():
        return "workdir"
    if (path / "params").is_dir() and (path / "config.json").exists():
        return "idefics_jax"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return "hf"
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected a Hugging Face directory (config.json + *.safetensors), an "
        f"idefics_jax checkpoint (config.json + params/) or a training workdir (config.json + checkpoints/)")


def load(path: str | Path, *, tokenizer: str | Path | None = None, mesh=None, dtype=None,
         quantize: str | None = None) -> LoadedModel:
    """Loads the model and processor settings of `path` (see the module docstring) onto the device,
    or with a `mesh` straight into the shards `Generator` places them in (each process reads only
    what its devices hold), so that a model that fits the mesh but not one device loads.
    dtype: the parameters' dtype (None: as stored; bfloat16 halves a float32 checkpoint's memory).
    quantize: "int8" quantises every projection as it is loaded (`models/quantize.py`: about a
    quarter of float32's bytes); a checkpoint saved quantised loads as it is."""
    quantize = check_quantize(quantize)
    path = as_path(path, "Checkpoint")
    kind = checkpoint_kind(path)
    if kind == "workdir":
        run = training_config(path)
        config, params, step = restore_workdir(path, config=run)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        default_tokenizer, images = tokenizer_of(path, run), training_image_processor(run)
        chat_format = None  # the model type's
        description = f"training workdir {path} at step {step}"
    else:
        config = Idefics2Config.from_json_file(path / "config.json")
        shardings = None if mesh is None else param_shardings(Idefics2(config), mesh)  # a quantised one's too
        read = load_hf_checkpoint if kind == "hf" else load_checkpoint
        config, params = read(path, shardings=shardings, dtype=dtype)
        default_tokenizer, images = tokenizer_path(path), image_processor_from(path, config)
        chat_format = chat_format_of(path, config.model_type)
        description = f"{'Hugging Face' if kind == 'hf' else 'idefics_jax'} checkpoint {path}"
    if quantize and not is_quantized(params):
        params = quantize_params(params, quantize)
        description += ", int8 weights"
    tokenizer_file = as_path(tokenizer, "--tokenizer") if tokenizer else default_tokenizer
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"No tokenizer: {tokenizer_file} does not exist (pass --tokenizer PATH, a "
                                f"sentencepiece .model or a tokenizer.json)")
    tok = open_tokenizer(tokenizer_file)
    check_tokenizer(tok, config, str(tokenizer_file))
    return LoadedModel(config, params, tok, images, description, chat_format)
