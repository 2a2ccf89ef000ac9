"""The processor files that travel with the weights: the tokenizer (`tokenizer.model`) and Hugging
Face's image-processing settings (`preprocessor_config.json`, `processor_config.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.paths import as_path

PROCESSOR_FILES = ("tokenizer.model", "preprocessor_config.json", "processor_config.json")  # beside the weights


def copy_processor_files(src: str | os.PathLike, dst: str | os.PathLike):
    """The tokenizer and image-processing settings travel with the weights (when there are any)."""
    src, dst = as_path(src, "Source directory"), as_path(dst, "Output directory")
    for name in PROCESSOR_FILES:
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


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
                          image_std=std[0], rescale_factor=settings.get("rescale_factor", 1 / 255),
                          image_sizing=settings.get("image_sizing", "keep_aspect"))


def save_image_processor(directory: Path, images: ImageProcessor):
    """Writes `images` as Hugging Face's `preprocessor_config.json` (what `image_processor_from` reads,
    and transformers' Idefics2ImageProcessor)."""
    settings = {"image_processor_type": "Idefics2ImageProcessor", "do_convert_rgb": True, "do_resize": True,
                "size": {"longest_edge": images.longest_edge, "shortest_edge": images.shortest_edge},
                "resample": 2, "do_rescale": True, "rescale_factor": images.rescale_factor, "do_normalize": True,
                "image_mean": [images.image_mean] * 3, "image_std": [images.image_std] * 3, "do_pad": True,
                "do_image_splitting": images.do_image_splitting,
                # ours (transformers' processor keeps the aspect ratio): written only when it does not
                **({"image_sizing": images.image_sizing} if images.image_sizing != "keep_aspect" else {})}
    (directory / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def training_image_processor(config) -> ImageProcessor:
    """The image sizes a training config's (first) source was processed at."""
    source = next(iter(config.data.sources.values()), {})
    return ImageProcessor(longest_edge=source.get("longest_edge", 980), shortest_edge=source.get("shortest_edge", 378),
                          image_sizing=source.get("image_sizing", config.data.get("image_sizing", "keep_aspect")))
