"""Idefics2-8B instruction tuning: The Cauldron + text-only instructions, DoRA, NEFTune, splitting.

Loss on answers only (conversation records), half of the images split into 4 crops + the whole
image (320 visual tokens), native resolution up to 980 px. Start from the pre-trained model:
`--config.model.init_from=<export of stage 2>`. The sources, under `data.dir`:

    the_cauldron/       HuggingFaceM4/the_cauldron as downloaded: a directory per subset of Parquet
                        files (`ai2d/train-00000-of-00001.parquet`, ...), all subsets read as one
                        source (each row a conversation); one subset alone:
                        `--config.data.sources.cauldron.path=the_cauldron/vqav2`
    text_instructions/  text-only conversations: Parquet rows in The Cauldron's schema with no
                        images (`format=parquet`), or our records (jsonl / ArrayRecord)

Docmatix reads the same way (`--config.data.sources.cauldron.path=docmatix`). For training at
scale convert first (`python data/prepare.py array_record DATA/the_cauldron DATA/cauldron_ar`, a
shard per subset file) and set `--config.data.sources.cauldron.format=array_record`.
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("idefics2-8b")
    c.data.sources = {
        "cauldron": dict(path="the_cauldron", format="parquet", weight=0.8, max_length=2048, split_probability=0.5),
        "text_instructions": dict(path="text_instructions", format="parquet", schema="the_cauldron", weight=0.2,
                                  max_length=2048),
    }
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
