"""Tiny SmolVLM on the synthetic rendered-text data: the main job (`configs/tiny.py`) at the
successors' shape, on a CPU.

    python -m idefics_jax.train --config configs/smolvlm_tiny.py --workdir /tmp/smolvlm_tiny

The tiny run with the `smolvlm-tiny` preset: a Llama decoder of `tiny`'s size, 112 px tiles, pixel
shuffle 4 (4 tokens per tile). Images are processed as SmolVLM's processor does: the longest edge
to 224 px, cut into up to 2 x 2 tiles + the whole image, each tile named in the prompt
(`<row_1_col_2>`, `<global-img>`); the synthetic data comes with a byte-level BPE `tokenizer.json`,
as SmolVLM's.
"""

import importlib.util
from pathlib import Path

from idefics_jax.train.config import model_section


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).with_name("tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _tiny()
    c.model = model_section("smolvlm-tiny")
    c.model.dtype = "float32"
    for source in c.data.sources.values():  # every image split into its tiles + the whole image
        source.longest_edge, source.split_probability = 224, 1.0
    c.data.image_slots = 40  # tiles: 3 to 5 per image
    c.data.buckets = [(112, 112)]  # every tile is one
    c.train.eval_split = True  # held-out images split as in training
    return c
