"""Idefics2-8B instruction tuning: The Cauldron + text-only instructions, DoRA, NEFTune, splitting.

Loss on answers only (conversation records), half of the images split into 4 crops + the whole
image (320 visual tokens), native resolution up to 980 px. Start from the pre-trained model:
`--config.model.init_from=<export of stage 2>`. `data.dir` holds `cauldron/` and `text_instructions/`
(ArrayRecord shards). The Cauldron's Parquet files, as downloaded from the Hub, convert with
`python data/prepare.py array_record the_cauldron/<subset> DATA/cauldron` (each subset's files
become shards of their own; Docmatix the same way).
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("idefics2-8b")
    c.data.sources = [
        dict(name="cauldron", path="cauldron", weight=0.8, max_length=2048, split_probability=0.5,
             format="array_record"),
        dict(name="text_instructions", path="text_instructions", weight=0.2, max_length=2048,
             format="array_record"),
    ]
    c.data.seq_len = 2048
    c.data.image_slots = 20
    c.data.buckets = [(490, 980), (980, 490), (980, 980)]
    c.data.batch_size = 1024
    c.data.num_workers = 16
    c.optimizer.accum_steps = 8
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.0
    c.train.steps = 5000
    c.train.remat = "full"
    c.train.scan_layers = True  # one compiled layer per tower: fast compiles at 8B
    c.train.neftune_alpha = 5.0
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.dora = True
    c.train.lora.towers = ["vision", "text"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
