"""A better language model or a better vision encoder, at the same data and steps: the CPU grid's
base (configs/ablations/base_cpu.py) with a larger decoder (`text_size=small`: 256 wide, 4 layers)
or a larger vision tower (`vision_size=small`: 128 wide, 4 layers). About 12 minutes on 2 cores;
with the same --workdir as configs/ablations/cpu.py its finished base point is reused.

    python -m idefics_jax.ablate --grid configs/ablations/cpu_backbones.py --workdir /tmp/ablations
"""

import ml_collections


def get_config():
    grid = ml_collections.ConfigDict()
    grid.base = "base_cpu.py"
    grid.seeds = [0]
    grid.common = ["train.checkpoint_every=200"]
    grid.points = [
        {"name": "base", "overrides": []},
        {"name": "text_small", "overrides": ["model.text_size=small"]},
        {"name": "vision_small", "overrides": ["model.vision_size=small"]},
    ]
    return grid
