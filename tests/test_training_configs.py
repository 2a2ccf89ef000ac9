"""Every stage config loads, validates and builds; the mixtures are the paper's."""

from __future__ import annotations

import jax
import pytest

from idefics_jax.data.pipeline import SourceConfig
from idefics_jax.train.run import build_run
from helpers.training import load_config as load


@pytest.mark.parametrize("name", ["tiny", "pretrain_stage1", "pretrain_stage2", "sft", "chat"])
def test_config_builds(name):
    config = load(name)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # this machine's devices
    if not config.data.synthetic:
        config.data.dir = "/data"  # a user sets it; build_run() requires it
    run = build_run(config)
    mcfg, schedule = run.model_config, run.schedule
    sources = [SourceConfig(**{**s, "path": s["path"]}) for s in config.data.sources]
    assert abs(sum(s.weight for s in sources) - 1.0) < 1e-9
    assert float(schedule(0)) > 0
    if name != "tiny":
        assert mcfg.text.num_hidden_layers == 32 and mcfg.vision.image_size == 980
        assert config.data.batch_size % jax.device_count() == 0


def test_paper_mixtures():
    weights = lambda c: {s["name"]: (s["weight"], s["max_length"]) for s in c.data.sources}
    assert weights(load("pretrain_stage1")) == {"interleaved": (0.7, 2048), "pairs": (0.3, 1536)}
    assert weights(load("pretrain_stage2")) == {"interleaved": (0.45, 2048), "pairs": (0.35, 1536),
                                                "pdfs": (0.2, 1024)}
    stage1 = load("pretrain_stage1")
    assert all(s["longest_edge"] == 384 for s in stage1.data.sources)
    sft = load("sft")
    assert sft.train.lora.dora and sft.train.neftune_alpha > 0
    assert any(s.get("split_probability", 0) == 0.5 for s in sft.data.sources)
