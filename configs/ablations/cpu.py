"""The paper's design choices on a laptop CPU: 12 points of the tiny model on the synthetic data with
the held-out tasks (configs/ablations/base_cpu.py), 600 steps each, about 50 minutes on 2 cores.

    python -m idefics_jax.ablate --grid configs/ablations/cpu.py --workdir /tmp/ablations

Every point changes one choice of the base (Perceiver with 4 latents, fully autoregressive, aspect
ratio kept, everything trained from scratch). The paper compared what trains on pre-trained
backbones; here the "pre-trained" towers are the base point's vision tower and decoder after its
600 steps (`model.init_towers=vision,text`), under a fresh connector (and fresh cross-attention
blocks): the points marked `pretrained_`. docs/ablations.md says what that can and cannot show.
The cross-attention points put a gated block before each of the 2 decoder layers.
"""

import ml_collections


def get_config():
    grid = ml_collections.ConfigDict()
    grid.base = "base_cpu.py"
    grid.seeds = [0]
    grid.common = ["train.checkpoint_every=200"]
    square = "data.image_sizing=square"
    cross = ["model.architecture=cross_attention", "model.cross_attention_every=1"]
    pretrained = ["model.init_from={workdir}/base/seed{seed}", "model.init_towers=vision,text"]
    split = [f"data.sources.{s}.split_probability=0.5" for s in ("tasks", "conversations", "pairs", "interleaved")]
    grid.points = [
        {"name": "base", "overrides": []},  # first: the others' pre-trained towers
        {"name": "cross_attention", "overrides": cross},
        {"name": "pretrained_frozen", "overrides": [*pretrained, "train.regime=frozen"]},
        {"name": "pretrained_lora", "overrides": [*pretrained, "train.regime=lora"]},
        {"name": "pretrained_full", "overrides": [*pretrained, "train.regime=full"]},
        {"name": "pretrained_cross_attention_frozen", "overrides": [*pretrained, *cross, "train.regime=frozen"]},
        {"name": "pretrained_cross_attention_lora", "overrides": [*pretrained, *cross, "train.regime=lora"]},
        {"name": "perceiver_64", "overrides": ["model.perceiver.resampler_n_latents=64"]},
        {"name": "no_pooling", "overrides": ["model.connector=mlp", square]},
        {"name": "pixel_shuffle_2", "overrides": ["model.connector=pixel_shuffle", "model.pixel_shuffle_factor=2",
                                                  square]},
        {"name": "square_images", "overrides": [square]},
        {"name": "image_splitting", "overrides": [*split, "train.eval_split=True"]},
    ]
    return grid
