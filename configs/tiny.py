"""Tiny Idefics2 on the synthetic rendered-text data: the CPU smoke run and the README's main job.

    python -m idefics_jax.train --config configs/tiny.py --workdir /tmp/idefics_tiny
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("tiny")
    # the tiny preset, at the synthetic images' scale: up to 112 px, 8 x 8 patches of 14 px
    c.model.vision.image_size = 112
    c.model.dtype = "float32"
    # 4 latents per image instead of the paper's 64: a "what is written" sample is then ~26 tokens,
    # so a 512-token row holds ~20 of them and each step sees ~150 images instead of ~30 (64
    # latents): on a CPU budget the vision tower's signal per step is what the run is short of
    c.model.perceiver.resampler_n_latents = 4
    c.data.synthetic = True
    c.data.synthetic_num = 1500
    c.data.synthetic_easy = True  # black single words / numbers: learnable from scratch in minutes
    # split_probability named so that a command line (or an ablation grid) can set it per source
    edges = dict(longest_edge=112, shortest_edge=28, split_probability=0.0)
    c.data.sources = {
        "conversations": dict(path="conversations", weight=0.75, max_length=512, **edges),
        "pairs": dict(path="pairs", weight=0.15, max_length=512, **edges),
        "interleaved": dict(path="interleaved", weight=0.1, max_length=512, **edges),
    }
    c.data.eval_source = "conversations_eval"
    c.data.seq_len = 512
    c.data.image_slots = 24
    c.data.buckets = [(56, 112), (112, 112)]
    c.data.batch_size = 8
    c.data.read_threads = 1  # 2 cores: one reader thread per source beats grain's 16 (GIL-bound decoding)
    c.data.read_buffer = 8
    # peak 3e-4: a higher rate collapses the Perceiver's output to one vector for every image while
    # the decoder learns the answers' prior, and the run never reads (docs/experiments/tiny_run.md)
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.train.steps = 600
    c.train.eval_samples = 150  # all of the held-out questions
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
