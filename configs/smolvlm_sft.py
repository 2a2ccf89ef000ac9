"""SmolVLM-256M instruction tuning on The Cauldron: the successors' fine-tuning on modest hardware.

Start from a converted (or Hugging Face) SmolVLM directory, which also gives the tokenizer
(`tokenizer.json`) unless `data.tokenizer` names another:

    python -m idefics_jax.train --config configs/smolvlm_sft.py --workdir runs/smolvlm_sft \
        --config.model.init_from=SmolVLM-256M-Instruct --config.data.dir=DATA

Images are processed as SmolVLM's processor does: the longest edge to 1536 px (SmolVLM's default
is 2048; 1536 keeps an image at most 3 x 3 tiles of 512 px + the whole image, 640 tokens), every
image split. Loss on the answers only; every parameter trains (256M: the optimizer state of a full
fine-tune fits one accelerator). The sources, under `data.dir`, as `configs/sft.py` lays them out:

    the_cauldron/       HuggingFaceM4/the_cauldron as downloaded (all subsets one source)
    text_instructions/  text-only conversations (Parquet rows in The Cauldron's schema)

A model of another size: `--config.model.*` as its config.json says (init_from names any
difference), or start from `base_config("smolvlm-tiny")`'s shape for a smoke run.
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("smolvlm-256m")
    edges = dict(longest_edge=1536, split_probability=1.0)
    c.data.sources = {
        "cauldron": dict(path="the_cauldron", format="parquet", weight=0.8, max_length=4096, **edges),
        "text_instructions": dict(path="text_instructions", format="parquet", schema="the_cauldron", weight=0.2,
                                  max_length=4096, **edges),
    }
    c.data.seq_len = 4096
    c.data.image_slots = 40  # tiles: up to 10 per image
    c.data.buckets = [(512, 512)]  # every tile is one
    c.data.batch_size = 64
    c.data.num_workers = 8
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.train.steps = 2000
    c.train.regime = "full"
    c.train.remat = "minimal"
    c.train.eval_split = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
