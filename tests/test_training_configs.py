"""Every stage config loads, validates and builds; the mixtures are the paper's."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from idefics_jax.data.pipeline import SourceConfig
from idefics_jax.train.run import build_run
from helpers.training import load_config as load


@pytest.mark.parametrize("name", ["tiny", "pretrain_stage1", "pretrain_stage2", "sft", "chat", "smolvlm_tiny",
                                  "smolvlm_sft"])
def test_config_builds(name):
    config = load(name)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # this machine's devices
    if not config.data.synthetic:
        config.data.dir = "/data"  # a user sets it; build_run() requires it
    run = build_run(config)
    mcfg, schedule = run.model_config, run.schedule
    sources = [SourceConfig(name, **s) for name, s in config.data.sources.items()]
    assert abs(sum(s.weight for s in sources) - 1.0) < 1e-9
    assert float(schedule(0)) > 0
    if name == "smolvlm_sft":
        assert mcfg.model_type == "smolvlm" and mcfg.image_seq_len == 64 and mcfg.vision.image_size == 512
    elif name not in ("tiny", "smolvlm_tiny"):
        assert mcfg.text.num_hidden_layers == 32 and mcfg.vision.image_size == 980
        assert config.data.batch_size % jax.device_count() == 0


def test_paper_mixtures():
    weights = lambda c: {name: (s["weight"], s["max_length"]) for name, s in c.data.sources.items()}
    assert weights(load("pretrain_stage1")) == {"obelics": (0.7, 2048), "pairs": (0.3, 1536)}
    assert weights(load("pretrain_stage2")) == {"obelics": (0.45, 2048), "pairs": (0.35, 1536), "pdfa": (0.2, 1024)}
    stage1 = load("pretrain_stage1")
    assert all(s["longest_edge"] == 384 for s in stage1.data.sources.values())
    sft = load("sft")
    assert sft.train.lora.dora and sft.train.neftune_alpha > 0
    assert sft.data.sources.cauldron.split_probability == 0.5


@pytest.mark.parametrize("name", ["pretrain_stage2", "sft"])
def test_stage_configs_read_the_published_layouts(name, tmp_path, seed):
    """Each stage config's sources, as its docstring lays them out under `data.dir` in the published
    formats (OBELICS Parquet + an img2dataset store, caption pairs and PDFA in WebDataset shards, The
    Cauldron's subset directories, text-only rows), give batches from every source; a path is a
    command-line key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import train_sentencepiece
    from helpers.published import (CAULDRON, OBELICS, cauldron_rows, encoded, img2dataset_store, obelics_row,
                                   pdf_of, pdfa_ocr, write_tar)
    from idefics_jax.data.tokenizer import Tokenizer
    from idefics_jax.train.data import make_pipeline

    rng = np.random.default_rng([seed, 38])
    data = tmp_path / "data"
    if name == "pretrain_stage2":
        images = {f"https://img.example.com/{k}.jpg": encoded(rng, "JPEG") for k in range(8)}
        img2dataset_store(data / "obelics_images", "webdataset", images, ["https://img.example.com/gone.jpg"])
        (data / "obelics").mkdir()
        rows = [obelics_row([("text", f"Paragraph {k}."), ("image", url), ("text", "More.")])
                for k, url in enumerate(images)]
        pq.write_table(pa.Table.from_pylist(rows, schema=OBELICS), data / "obelics" / "train-00000-of-00001.parquet")
        (data / "pairs").mkdir()
        write_tar(data / "pairs" / "00000.tar", [item for k in range(6) for item in
                                                 [(f"{k:09d}.jpg", encoded(rng, "JPEG")), (f"{k:09d}.txt", b"a photo")]])
        (data / "pdfa").mkdir()
        write_tar(data / "pdfa" / "pdfa-eng-wds-0000.tar", [item for k in range(3) for item in
                                                           [(f"d{k}.pdf", pdf_of(2, rng)),
                                                            (f"d{k}.json", pdfa_ocr([["page one"], ["two"]]))]])
    else:
        for subset in ("ai2d", "vqav2"):
            (data / "the_cauldron" / subset).mkdir(parents=True)
            rows, _ = cauldron_rows(rng, 6)
            pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON),
                           data / "the_cauldron" / subset / "train-00000-of-00001.parquet")
        (data / "text_instructions").mkdir()
        rows = [{"images": [], "texts": [{"user": f"Say {k}.", "assistant": f"{k}", "source": "text"}]} for k in range(6)]
        pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON), data / "text_instructions" / "train.parquet")
    config = load(name)
    config.data.seq_len, config.data.image_slots, config.data.buckets = 1024, 8, [(56, 56)]
    config.data.batch_size, config.data.num_workers, config.data.read_threads, config.data.read_buffer = 2, 0, 1, 4
    for source in config.data.sources.values():
        source.longest_edge, source.shortest_edge = 56, 28
    if name == "pretrain_stage2":
        config.data.sources.pdfa.dpi = 36
    tokenizer_path = tmp_path / "tokenizer.model"
    tokenizer_path.write_bytes(train_sentencepiece(seed))
    pipeline = make_pipeline(config, data, Tokenizer(tokenizer_path), image_seq_len=4)
    for _ in range(12):
        next(pipeline)
    packed = {k for k, v in pipeline.stats.items() if k.startswith("packed/") and v > 0}
    assert packed == {f"packed/{source}" for source in config.data.sources}, pipeline.stats
    config.data.sources[next(iter(config.data.sources))].path = "elsewhere"
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        make_pipeline(config, data, Tokenizer(tokenizer_path), image_seq_len=4)
