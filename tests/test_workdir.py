"""A training workdir read for its model (`idefics_jax.checkpoints`): only the parameters, adapters
merged, layers unstacked, whatever optimizer the run had; and the kinds `load` tells apart."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from helpers.training import flip_bytes, load_config
from idefics_jax.checkpoints import checkpoint_kind, load, restore_workdir
from idefics_jax.checkpoints.train_state import Checkpointer
from idefics_jax.models.lora import merge
from idefics_jax.models.scan import unstack_layers
from idefics_jax.train.run import build_run


def test_workdir_parameters_are_read_without_its_optimizer(tmp_path, seed, caplog):
    """A run with scanned layers and DoRA adapters, saved with an optimizer state that its config
    would not build: the parameters come back merged and unstacked, the optimizer state unread."""
    config = load_config("tiny")
    config.train.scan_layers, config.train.lora.rank, config.train.lora.dora = True, 4, True
    run = build_run(config)
    state = run.init_state(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)  # adapters away from where they start, so merging changes the kernels
    params = jax.tree.map(lambda x: x + np.float32(rng.normal(scale=0.02)), state.params)
    other_optimizer = optax.adam(1e-3).init({"w": np.zeros((3, 5), np.float32)})
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    for step in (3, 5):
        checkpointer.save(step, state.replace(params=params, opt_state=other_optimizer), {"pipeline": {}})
    checkpointer.close()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))

    model_config, restored, step = restore_workdir(tmp_path)
    assert step == 5 and model_config == run.model_config
    expected = unstack_layers(merge(params, run.lora))
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restore_workdir(tmp_path, step=3)[2] == 3
    assert checkpoint_kind(tmp_path) == "workdir"

    # a reader (generate, serve, --export_hf) checks the checksums too: it falls back to step 3
    # and leaves the training run's directory as it is
    flip_bytes(np.random.default_rng(seed), tmp_path / "checkpoints" / "5")
    with caplog.at_level("WARNING"):
        assert restore_workdir(tmp_path)[2] == 3
    assert "Checkpoint step 5 is corrupt" in caplog.text and (tmp_path / "checkpoints" / "5").is_dir()


def test_what_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint: expected a Hugging Face directory"):
        load(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        restore_workdir(tmp_path)
