"""A gs:// workdir, against a Cloud Storage emulator: training resumes from the bucket exactly,
and the bucket serves generation, plots and profiles; bad URLs are named."""

from __future__ import annotations

import numpy as np
import pytest

from idefics_jax.paths import as_path
from train_helpers import load_config


def tiny(steps: int, data_dir, seed: int):
    c = load_config("tiny")
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 1, 1
    c.data.synthetic_num, c.data.batch_size, c.data.seq_len, c.data.seed = 60, 4, 256, seed
    c.data.dir, c.data.eval_source = str(data_dir), ""
    return c


def test_training_in_a_bucket_resumes_exactly_and_serves(gcs_bucket, tmp_path, seed):
    from idefics_jax.inference.loading import load_for_inference
    from idefics_jax.train.loop import train
    from idefics_jax.train.metrics import plot_loss, read_metrics

    data = tmp_path / "data"
    expected = train(tiny(3, data, seed), tmp_path / "local")
    run = f"{gcs_bucket}/runs/{seed}"
    first = tiny(2, data, seed)
    first.train.profile_first_step, first.train.profile_steps = 2, 1
    assert [s for s, _ in train(first, run)["history"]] == [1, 2]
    # a save killed half way: step 3's files without orbax's commit marker, which resuming ignores
    step2, step3 = as_path(f"{run}/checkpoints/2"), as_path(f"{run}/checkpoints/3")
    (step3 / "state").mkdir(parents=True, exist_ok=True)
    (step3 / "state" / "_METADATA").write_bytes((step2 / "state" / "_METADATA").read_bytes())
    resumed = train(tiny(3, data, seed), run)
    assert resumed["history"] == expected["history"][2:]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(run)] == expected["history"]

    bucket = as_path(run)
    assert list((bucket / "tensorboard").glob("events.out.tfevents.*"))
    assert list((bucket / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert plot_loss(run) == f"{run}/loss.png"
    assert (bucket / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_for_inference(run)  # the tokenizer comes from the bucket too
    assert loaded.description.endswith("at step 3") and loaded.tokenizer.vocab_size == expected_vocab(data)
    for ours, trained in zip(*(jax_leaves(t) for t in (loaded.params, resumed["state"].params))):
        np.testing.assert_array_equal(ours, trained)


def expected_vocab(data) -> int:
    from idefics_jax.data.tokenizer import Tokenizer

    return Tokenizer(data / "tokenizer.model").vocab_size


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_urls_that_cannot_serve_are_named(gcs_bucket, tmp_path):
    from idefics_jax.inference.loading import load_for_inference
    from idefics_jax.train.loop import prepare_data

    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        as_path("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match="Checkpoint directory gs://idefics-test/empty does not exist"):
        load_for_inference(f"{gcs_bucket}/empty")
    hf = as_path(f"{gcs_bucket}/hf")
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="read from local disk; copy it first"):
        load_for_inference(str(hf))
    config = tiny(1, f"{gcs_bucket}/data", 0)
    with pytest.raises(ValueError, match="config.data.dir gs://idefics-test/data: URLs are not supported here"):
        prepare_data(config, as_path(tmp_path))
