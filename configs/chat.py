"""Idefics2-8B chat tuning: a few hundred steps on conversations (LLaVA-Conv, ShareGPT4V).

Start from the instruction-tuned model (`--config.model.init_from=<export of sft>`);
`data.dir` holds `llava_conv/` and `sharegpt4v/` as conversation records.
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("idefics2-8b")
    c.data.sources = {
        "llava_conv": dict(path="llava_conv", weight=0.5, max_length=2048, format="array_record"),
        "sharegpt4v": dict(path="sharegpt4v", weight=0.5, max_length=2048, format="array_record"),
    }
    c.data.seq_len = 2048
    c.data.image_slots = 8
    c.data.buckets = [(490, 980), (980, 490), (980, 980)]
    c.data.batch_size = 256
    c.data.num_workers = 16
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.train.steps = 400
    c.train.remat = "full"
    c.train.scan_layers = True  # one compiled layer per tower: fast compiles at 8B
    c.train.checkpoint_every = 100
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.dora = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
