"""The paper's ablation grid at its scale (Idefics2-8B's towers, 6,000 steps per point, scored on
held-out data), for a pod: the same file as configs/ablations/cpu.py, on the stage-1 config.

    python -m idefics_jax.ablate --grid configs/ablations/paper.py --workdir /ablations \\
        --set data.dir=/data --set data.tokenizer=/data/tokenizer.model --set model.init_from=/idefics2-base \\
        --set data.eval_source=vqa_eval

The paper compared on pre-trained backbones (`model.init_from`: a converted checkpoint, or the
towers it starts from) and scored the mean of VQAv2, TextVQA, OKVQA and COCO: point
`data.eval_source` at one of them (a held-out conversation set; run the grid once per task). Square
points resize to 378 px and feed the mlp and pixel-shuffle connectors at that side (27 x 27 patches:
729 tokens without pooling, as in the paper); their vision tower is built for 378 px
(`model.vision.image_size`), whose position embeddings a 980 px checkpoint does not fill: start
those points from a tower of that size. The cross-attention points start their blocks from scratch
(gates at 0: the decoder's function at the start), as the paper's did.
"""

import ml_collections


def get_config():
    grid = ml_collections.ConfigDict()
    grid.base = "../pretrain_stage1.py"
    grid.seeds = [0]
    grid.common = ["train.steps=6000", "train.checkpoint_every=500", "train.regime=lora",
                   "train.lora.rank=16", "train.lora.alpha=32.0"]
    square = ["data.image_sizing=square", "model.vision.image_size=378"]
    cross = ["model.architecture=cross_attention", "model.cross_attention_every=4"]
    grid.points = [
        {"name": "perceiver_64", "overrides": []},
        {"name": "perceiver_128", "overrides": ["model.perceiver.resampler_n_latents=128"]},
        {"name": "no_pooling", "overrides": ["model.connector=mlp", *square,
                                             "data.sources.obelics.longest_edge=378",
                                             "data.sources.pairs.longest_edge=378"]},
        {"name": "pixel_shuffle_3", "overrides": ["model.connector=pixel_shuffle", "model.pixel_shuffle_factor=3",
                                                  *square, "data.sources.obelics.longest_edge=378",
                                                  "data.sources.pairs.longest_edge=378"]},
        {"name": "square_images", "overrides": ["data.image_sizing=square"]},
        {"name": "frozen_backbones", "overrides": ["train.regime=frozen", "train.lora.rank=0"]},
        {"name": "full_fine_tuning", "overrides": ["train.regime=full", "train.lora.rank=0"]},
        # Flamingo / Idefics1 style: a gated cross-attention block before every 4th of Mistral's 32 layers
        {"name": "cross_attention_frozen", "overrides": [*cross, "train.regime=frozen", "train.lora.rank=0"]},
        {"name": "cross_attention_lora", "overrides": cross},
    ]
    return grid
