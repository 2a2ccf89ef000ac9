"""The tiny end-to-end job: build, export, convert back, and run an Idefics2 on one CPU.

    python -m idefics_jax.demo --workdir /tmp/idefics_demo

1. initialises the `tiny` preset (or `--preset NAME`) with random weights;
2. writes it as a Hugging Face checkpoint (`WORKDIR/hf`: safetensors + config.json);
3. converts that to an idefics_jax checkpoint (`WORKDIR/ckpt`), as `python -m idefics_jax.convert
   from-hf` does, and loads it back;
4. renders an image with text on it (PIL), builds a prompt with its `<image>` tokens, and runs the
   jitted forward pass, printing the logits' shape and timings.

Training replaces this as the main job once the data pipeline and trainer land.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from idefics_jax import Idefics2, Idefics2Config, load_checkpoint, load_hf_checkpoint, save_checkpoint
from idefics_jax import save_hf_checkpoint


def render_text_image(text: str, size=(160, 96)) -> np.ndarray:
    image = Image.new("RGB", size, (250, 245, 230))
    ImageDraw.Draw(image).text((10, size[1] // 3), text, fill=(20, 20, 90))
    return np.asarray(image)


def to_model_input(image: np.ndarray, max_side: int):
    """Resize to fit `max_side` (aspect ratio kept), rescale to [-1, 1] (mean = std = 0.5)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32)
    pixels = (resized / 255.0 - 0.5) / 0.5  # [height, width, 3]
    return pixels[None, None], np.ones(pixels.shape[:2], bool)[None, None]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m idefics_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/idefics_demo")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    for sub in ("hf", "ckpt"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    config = Idefics2Config.preset(args.preset)
    model = Idefics2(config)

    start = time.time()
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, 8), jnp.int32))["params"]
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"[1/4] initialised '{args.preset}': {count:,} parameters ({time.time() - start:.1f}s)")

    start = time.time()
    save_hf_checkpoint(workdir / "hf", config, params, max_shard_size="4MB")
    shards = sorted(p.name for p in (workdir / "hf").glob("*.safetensors"))
    print(f"[2/4] wrote Hugging Face checkpoint {workdir / 'hf'}: {len(shards)} shard(s) ({time.time() - start:.1f}s)")

    start = time.time()
    config, hf_params = load_hf_checkpoint(workdir / "hf", on_device=False)
    save_checkpoint(workdir / "ckpt", config, hf_params)
    config, params = load_checkpoint(workdir / "ckpt")
    print(f"[3/4] converted to idefics_jax checkpoint {workdir / 'ckpt'} and loaded it ({time.time() - start:.1f}s)")

    pixel_values, pixel_mask = to_model_input(render_text_image("idefics_jax"), config.vision.image_size)
    rng = np.random.default_rng(args.seed)
    n = config.image_seq_len
    text = rng.integers(3, config.image_token_id - 1, size=12)
    input_ids = np.concatenate([text[:4], [config.image_token_id] * n, text[4:]])[None].astype(np.int32)
    forward = jax.jit(lambda p, ids, pv, pm: model.apply({"params": p}, ids, pixel_values=pv, pixel_attention_mask=pm))
    start = time.time()
    logits = forward(params, input_ids, pixel_values, pixel_mask).block_until_ready()
    compile_s = time.time() - start
    start = time.time()
    logits = forward(params, input_ids, pixel_values, pixel_mask).block_until_ready()
    print(f"[4/4] forward on an image {pixel_values.shape[2]}x{pixel_values.shape[3]} + {input_ids.shape[1]} tokens: "
          f"logits {tuple(logits.shape)}, finite={bool(jnp.isfinite(logits).all())}, "
          f"compile {compile_s:.1f}s, run {1000 * (time.time() - start):.1f} ms on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
