"""Idefics2-8B pre-training, stage 1: images up to 384 px, 70% OBELICS documents, 30% image-text pairs.

    python -m idefics_jax.train --config configs/pretrain_stage1.py --workdir gs://bucket/stage1 \
        --config.data.dir=/data --config.data.tokenizer=/data/tokenizer.model

The sources are read as published, under `data.dir` (each path a key, e.g.
`--config.data.sources.obelics.path=...`; layouts in docs/data.md):

    obelics/          HuggingFaceM4/OBELICS's Parquet files (the Hub's `data/*.parquet`)
    obelics_images/   its images, fetched once from the rows' URLs with img2dataset
                      (`--output_format webdataset`); `python data/prepare.py images DIR` indexes them
    pairs/            image-caption pairs (LAION-COCO, PMD) as img2dataset WebDataset shards (`KEY.jpg` +
                      `KEY.txt`)

Parquet decodes a row group per shuffled row; for training at scale convert OBELICS once
(`python data/prepare.py array_record DATA/obelics DATA/obelics_ar --image-store DATA/obelics_images`)
and read the shards: `--config.data.sources.obelics.path=obelics_ar --config.data.sources.obelics.format=array_record`.
The paper trains the backbones through LoRA (full unfreezing diverged) and the connector fully;
its average batch is 2048 sequences.
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("idefics2-8b")
    edges = dict(longest_edge=384, shortest_edge=378)
    c.data.sources = {
        "obelics": dict(path="obelics", format="parquet", image_store="obelics_images", weight=0.7, max_length=2048,
                        **edges),
        "pairs": dict(path="pairs", format="webdataset", schema="pairs", weight=0.3, max_length=1536, **edges),
    }
    c.data.seq_len = 2048
    c.data.image_slots = 24
    c.data.buckets = [(378, 384), (384, 384)]
    c.data.batch_size = 2048
    c.data.num_workers = 16
    c.optimizer.accum_steps = 8  # sequences per device step = batch / (devices x 8)
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 1000
    c.train.steps = 50_000
    # XLA:CPU's estimate of a step's own memory per row here (benchmarks/remat.py, 8B, one device):
    # full 2.5 GB, save_qkv_proj 5.7 GB, minimal 19 GB; none 190 GB. Recomputing less is faster where it fits.
    c.train.remat = "full"
    c.train.scan_layers = True  # one compiled layer per tower: fast compiles at 8B
    c.train.checkpoint_every = 1000
    c.train.keep_period = 10_000
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.towers = ["vision", "text"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
