"""Training-test helpers: a tiny model, optimizer and packed batch (no files needed); the stage configs."""

import importlib.util
from pathlib import Path

import numpy as np

from idefics_jax import Idefics2, Idefics2Config
from idefics_jax.data.packing import PackConfig, collate, finalize, pack_row
from idefics_jax.train.optimizer import make_optimizer

CONFIGS = Path(__file__).parents[2] / "configs"


def load_config(name: str):
    """`configs/<name>.py`'s `get_config()`."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(connector: str = "perceiver", architecture: str = "fully_autoregressive",
                model_type: str = "idefics2") -> Idefics2Config:
    """model_type idefics3 / smolvlm: a Llama decoder (no window, Llama 3 RoPE) under the pixel shuffle."""
    c = Idefics2Config.preset("tiny")
    text = c.text.replace(sliding_window=32)
    if model_type != "idefics2":
        text = text.replace(model_type="llama", sliding_window=None, rope_type="llama3",
                            rope_original_max_position_embeddings=32)
    return c.replace(vision=c.vision.replace(image_size=56, patch_size=7),
                     perceiver=c.perceiver.replace(resampler_n_latents=8), text=text, connector=connector,
                     architecture=architecture, cross_attention_every=1, model_type=model_type)


def open_gates(tree, value: float = 0.5):
    """`tree` (parameters, or a train state) with every cross-attention gate (`alpha_*`) at `value`: at
    their initial 0 the blocks are the identity and their other weights get no gradient."""
    import jax

    def set_gate(path, x):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        return np.full_like(np.asarray(x), value) if str(name).startswith("alpha_") else x
    return jax.tree_util.tree_map_with_path(set_gate, tree)


def tiny_batch(config: Idefics2Config, seed: int, batch_size: int, seq_len: int = 96) -> dict:
    """Packed rows of random samples with images, as the pipeline makes them."""
    rng = np.random.default_rng(seed)
    pack = PackConfig(seq_len=seq_len, image_slots=3, buckets=((56, 56),))
    rows = []
    for _ in range(batch_size):
        samples, used, images = [], 0, 0
        while True:
            n_images = int(rng.integers(0, 2))
            text = int(rng.integers(5, 25))
            n = 1 + text + n_images * config.image_seq_len
            if used + n > seq_len or images + n_images > 3:
                break
            tokens = np.concatenate([[1], rng.integers(3, 1000, text // 2),
                                     [config.image_token_id] * (n_images * config.image_seq_len),
                                     rng.integers(3, 1000, text - text // 2)]).astype(np.int32)
            samples.append({"input_ids": tokens, "targets": tokens != config.image_token_id,
                            "images": [rng.integers(0, 256, (int(rng.integers(14, 57)), int(rng.integers(14, 57)), 3),
                                                    dtype=np.uint8) for _ in range(n_images)]})
            used, images = used + n, images + n_images
        rows.append(pack_row(samples, pack, {}))
    return finalize(collate(rows, pack))


def tiny_setup(seed: int, batch_size: int = 8, frozen=(), sgd: bool = False, connector: str = "perceiver",
               architecture: str = "fully_autoregressive", model_type: str = "idefics2"):
    """sgd=True: plain SGD, whose update is proportional to the gradient, for comparing steps
    (Adam's first update is about lr * sign(g), which amplifies round-off in gradients that are
    zero in exact arithmetic, such as the key projections' biases)."""
    import optax

    config = tiny_config(connector, architecture, model_type)
    model = Idefics2(config)
    if sgd:
        tx = optax.sgd(0.1)
    else:
        tx, _ = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, frozen=frozen)
    return model, tx, tiny_batch(config, seed, batch_size)


def flip_bytes(rng, step_dir: Path) -> str:
    """Flips 1 to 64 bytes at a random offset of a random file of `step_dir`; the file's name."""
    files = sorted(f for f in step_dir.rglob("*") if f.is_file() and f.stat().st_size)
    file = files[int(rng.integers(len(files)))]
    data = bytearray(file.read_bytes())
    start = int(rng.integers(len(data)))
    for i in range(start, min(len(data), start + int(rng.integers(1, 65)))):
        data[i] ^= int(rng.integers(1, 256))
    file.write_bytes(bytes(data))
    return str(file.relative_to(step_dir))
