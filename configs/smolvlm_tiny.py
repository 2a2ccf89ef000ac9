"""Tiny SmolVLM on the synthetic rendered-text data: the main job (`configs/tiny.py`) for the
successors' shape, on a CPU.

    python -m idefics_jax.train --config configs/smolvlm_tiny.py --workdir /tmp/smolvlm_tiny

The `smolvlm-tiny` preset: a Llama decoder of `tiny`'s size, 112 px tiles, pixel shuffle 4 (4
tokens per tile). Images are processed as SmolVLM's processor does: the longest edge to 224 px,
cut into up to 2 x 2 tiles + the whole image, each tile named in the prompt (`<row_1_col_2>`,
`<global-img>`); the synthetic data comes with a byte-level BPE `tokenizer.json`, as SmolVLM's.
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("smolvlm-tiny")
    c.model.dtype = "float32"
    c.data.synthetic = True
    c.data.synthetic_num = 1500
    c.data.synthetic_easy = True  # black single words / numbers: learnable from scratch in minutes
    # every image split into its tiles + the whole image, as SmolVLM trains and answers
    edges = dict(longest_edge=224, split_probability=1.0)
    c.data.sources = {
        "conversations": dict(path="conversations", weight=0.75, max_length=512, **edges),
        "pairs": dict(path="pairs", weight=0.15, max_length=512, **edges),
        "interleaved": dict(path="interleaved", weight=0.1, max_length=512, **edges),
    }
    c.data.eval_source = "conversations_eval"
    c.data.seq_len = 512
    c.data.image_slots = 40  # tiles: 3 to 5 per image
    c.data.buckets = [(112, 112)]  # every tile is one
    c.data.batch_size = 8
    c.data.read_threads = 1
    c.data.read_buffer = 8
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.train.steps = 600
    c.train.eval_samples = 150
    c.train.eval_split = True
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
