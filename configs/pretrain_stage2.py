"""Idefics2-8B pre-training, stage 2: up to 980 px, PDFs added: 45% documents, 35% pairs, 20% PDFs.

Starts from stage 1 (`--config.model.init_from=<stage 1 export>`): export stage 1 with
`python -m idefics_jax.train --config configs/pretrain_stage1.py --workdir W --export_hf DIR`.
The sources are stage 1's (`obelics/` with `obelics_images/`, `pairs/`; see configs/pretrain_stage1.py)
and PDFA as published:

    pdfa/             pixparse/pdfa-eng-wds's WebDataset shards (`pdfa-eng-wds-*.tar`: a `.pdf` and
                      its OCR `.json` per sample); each page a document, rendered at `dpi`

The paper's 20% of PDFs also held OCR-IDL and rendered text; add them as sources of their own
(`--config.data.sources.pdfa.weight` and the others' weights then share the 20%).
"""

from idefics_jax.train.config import base_config


def get_config():
    c = base_config("idefics2-8b")
    edges = dict(longest_edge=980, shortest_edge=378)
    c.data.sources = {
        "obelics": dict(path="obelics", format="parquet", image_store="obelics_images", weight=0.45, max_length=2048,
                        **edges),
        "pairs": dict(path="pairs", format="webdataset", schema="pairs", weight=0.35, max_length=1536, **edges),
        "pdfa": dict(path="pdfa", format="webdataset", schema="pdfa", dpi=150, weight=0.20, max_length=1024, **edges),
    }
    c.data.seq_len = 2048
    c.data.image_slots = 16
    c.data.buckets = [(490, 980), (980, 490), (980, 980)]
    c.data.batch_size = 2048
    c.data.num_workers = 16
    c.optimizer.accum_steps = 16
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.train.steps = 20_000
    c.train.remat = "full"
    c.train.scan_layers = True  # one compiled layer per tower: fast compiles at 8B
    c.train.checkpoint_every = 1000
    c.train.keep_period = 5000
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.towers = ["vision", "text"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
