"""The paper's design choices on a laptop CPU: 8 points of the tiny model on the synthetic data,
600 steps each (the tiny run's), about 35 minutes on 2 cores in all.

    python -m idefics_jax.ablate --grid configs/ablations/cpu.py --workdir /tmp/ablations

Every point starts from the tiny run (`configs/tiny.py`: Perceiver with 4 latents, aspect ratio
kept, everything trained from scratch) and changes one choice. The backbones are random here, not
pre-trained as the paper's were: "frozen" and "lora" freeze random towers (docs/ablations.md says
what that can and cannot show). Cross-attention is not a switch yet.
"""

import ml_collections


def get_config():
    grid = ml_collections.ConfigDict()
    grid.base = "../tiny.py"
    grid.seeds = [0]
    grid.common = ["train.checkpoint_every=200"]
    square = "data.image_sizing=square"
    grid.points = [
        {"name": "base", "overrides": []},
        {"name": "perceiver_64", "overrides": ["model.perceiver.resampler_n_latents=64"]},
        {"name": "no_pooling", "overrides": ["model.connector=mlp", square]},
        {"name": "pixel_shuffle_2", "overrides": ["model.connector=pixel_shuffle", "model.pixel_shuffle_factor=2",
                                                  square]},
        {"name": "square_images", "overrides": [square]},
        {"name": "image_splitting", "overrides": ["data.sources.conversations.split_probability=0.5"]},
        {"name": "frozen_backbones", "overrides": ["train.regime=frozen"]},
        {"name": "lora_backbones", "overrides": ["train.regime=lora"]},
    ]
    return grid
