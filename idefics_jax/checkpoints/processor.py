"""The processor files that travel with the weights: the tokenizer (`tokenizer.model`, or
`tokenizer.json` and `tokenizer_config.json`), Hugging Face's image-processing settings
(`preprocessor_config.json`, `processor_config.json`) and a chat template (`chat_template.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from idefics_jax.config import Idefics2Config, tile_side
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.pipeline import SourceConfig
from idefics_jax.data.processor import CHAT_FORMATS, apply_chat_template
from idefics_jax.paths import as_path

PROCESSOR_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")  # beside the weights
TILE_PROCESSOR_TYPES = {"idefics3": "Idefics3ImageProcessor", "smolvlm": "SmolVLMImageProcessor"}


def copy_processor_files(src: str | os.PathLike, dst: str | os.PathLike):
    """The tokenizer and image-processing settings travel with the weights (when there are any)."""
    src, dst = as_path(src, "Source directory"), as_path(dst, "Output directory")
    for name in PROCESSOR_FILES:
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def _mean_std(settings: dict, path) -> tuple[float, float]:
    mean, std = settings.get("image_mean", [0.5]), settings.get("image_std", [0.5])
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise ValueError(f"{path}: per-channel image_mean / image_std are not supported ({mean}, {std})")
    return mean[0], std[0]


def image_processor_from(directory: Path, config: Idefics2Config) -> ImageProcessor | TileImageProcessor:
    """Reads Hugging Face's image-processing settings (`preprocessor_config.json`, or the
    `image_processor` entry of `processor_config.json`, where transformers 5 saves them) when there
    are any; else the defaults of the model's type (Idefics2's, or tiles of the vision tower's size
    for Idefics3 / SmolVLM)."""
    path, settings = directory / "preprocessor_config.json", {}
    if path.exists():
        settings = json.loads(path.read_text())
    elif (directory / "processor_config.json").exists():
        path = directory / "processor_config.json"
        settings = json.loads(path.read_text()).get("image_processor") or {}
    size = settings.get("size") or {}
    mean, std = _mean_std(settings, path)
    if tile_side(config):
        tile = (settings.get("max_image_size") or {}).get("longest_edge", tile_side(config))
        return TileImageProcessor(longest_edge=size.get("longest_edge", 4 * tile), tile=tile,
                                  do_image_splitting=settings.get("do_image_splitting", True), image_mean=mean,
                                  image_std=std, rescale_factor=settings.get("rescale_factor", 1 / 255))
    return ImageProcessor(longest_edge=size.get("longest_edge", 980), shortest_edge=size.get("shortest_edge", 378),
                          do_image_splitting=settings.get("do_image_splitting", False), image_mean=mean,
                          image_std=std, rescale_factor=settings.get("rescale_factor", 1 / 255),
                          image_sizing=settings.get("image_sizing", "keep_aspect"))


def save_image_processor(directory: Path, images: ImageProcessor | TileImageProcessor, model_type: str = "idefics2"):
    """Writes `images` as Hugging Face's `preprocessor_config.json` (what `image_processor_from` reads,
    and transformers' Idefics2ImageProcessor, Idefics3ImageProcessor or SmolVLMImageProcessor)."""
    common = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": images.rescale_factor,
              "do_normalize": True, "image_mean": [images.image_mean] * 3, "image_std": [images.image_std] * 3,
              "do_pad": True, "do_image_splitting": images.do_image_splitting}
    if isinstance(images, TileImageProcessor):
        settings = {"image_processor_type": TILE_PROCESSOR_TYPES[model_type], **common, "resample": 1,
                    "size": {"longest_edge": images.longest_edge}, "max_image_size": {"longest_edge": images.tile}}
    else:
        settings = {"image_processor_type": "Idefics2ImageProcessor", **common, "resample": 2,
                    "size": {"longest_edge": images.longest_edge, "shortest_edge": images.shortest_edge},
                    # ours (transformers' processor keeps the aspect ratio): written only when it does not
                    **({"image_sizing": images.image_sizing} if images.image_sizing != "keep_aspect" else {})}
    (directory / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def training_image_processor(config) -> ImageProcessor | TileImageProcessor:
    """The image processing a training config's (first) source was processed with (as the pipeline
    does it: `SourceConfig.image_processor`)."""
    name, source = next(iter(config.data.sources.items()), ("", {"path": ""}))
    source = {"image_sizing": config.data.get("image_sizing", "keep_aspect"), **dict(source)}
    return SourceConfig(name=name, **source).image_processor(tile_side(config.model))


# A conversation that tells the chat formats apart: a system turn, an image first, text first, an answer.
_PROBE = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
          {"role": "user", "content": [{"type": "text", "text": "And its colour?"}, {"type": "image"}]}]


def chat_template_of(directory: Path) -> tuple[str, Path] | None:
    """(the chat template a checkpoint directory ships for its processor, the file it is in), or
    None. A template in `tokenizer_config.json` is the text tokenizer's (Llama 3 Instruct's in
    Idefics3's directory): transformers' processors do not read it, nor do we."""
    for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template"),
                      ("processor_config.json", "chat_template")):
        path = directory / name
        if path.exists():
            template = path.read_text() if key is None else json.loads(path.read_text()).get(key)
            if isinstance(template, str):
                return template, path
    return None


def chat_format_of(directory: Path, model_type: str) -> str:
    """The chat format (`data.processor.CHAT_FORMATS`) of a checkpoint directory: the one its chat
    template writes (rendered by jinja2, as transformers does, on a conversation that tells the
    formats apart), else its model type's. A template none of them writes is an error naming it."""
    found = chat_template_of(directory)
    if found is None:
        return model_type
    template, path = found
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(messages=_PROBE, add_generation_prompt=True, bos_token="",
                                                eos_token="")
    except jinja2.TemplateError as error:
        raise ValueError(f"The chat template in {path} does not render: {error}") from error
    for chat_format in [model_type] + [f for f in CHAT_FORMATS if f != model_type]:
        if text == apply_chat_template(_PROBE, True, chat_format):
            return chat_format
    raise ValueError(f"The chat template in {path} writes a format idefics_jax does not know (it knows "
                     f"{tuple(CHAT_FORMATS)}); its rendering of a sample conversation: {text[:200]!r}")
