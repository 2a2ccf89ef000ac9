"""Scan over layers: the same model and the same training step as the unrolled layers."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

from conftest import rel_err
from idefics_jax import Idefics2
from idefics_jax.models.scan import stack_layers, unstack_layers
from idefics_jax.sharding import make_mesh
from idefics_jax.train.lora import LoraConfig, add_adapters, merge
from idefics_jax.train.loop import global_batch
from idefics_jax.train.step import MODEL_KEYS, init_state, make_train_step
from test_parity import make_batch
from train_helpers import tiny_setup


def flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def test_scanned_model_equals_unrolled(converted, seed):
    config, params = converted
    stacked = stack_layers(params)
    q = stacked["model"]["text_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape[0] == config.text.num_hidden_layers
    assert "layers_0" in stacked["model"]["connector"]["perceiver_resampler"]  # the Perceiver is not scanned
    back = flat(unstack_layers(stacked))
    assert back.keys() == flat(params).keys()
    assert all(np.array_equal(back[k], v) for k, v in flat(params).items())

    rng = np.random.default_rng([seed, 500])
    ids, mask, pixels, pixel_mask = make_batch(rng, [([4, 3], [(40, 36)]), ([9, 5], [(28, 52)])], config.image_seq_len)
    run = lambda model, p: np.asarray(jax.jit(lambda p: model.apply(
        {"params": p}, ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask))(p))
    expected = run(Idefics2(config), params)
    assert rel_err(run(Idefics2(config, scan_layers=True), stacked), expected) < 1e-5
    assert rel_err(run(Idefics2(config, scan_layers=True, remat=True), stacked), expected) < 1e-5
    # adapters on stacked kernels merge like adapters on each layer's kernel
    lora = LoraConfig(rank=4, alpha=8, dora=True, targets="q_proj|v_proj", towers=("text", "vision"))
    adapted = nn.meta.unbox(add_adapters(stacked, lora, jax.random.PRNGKey(seed)))
    adapted["lora"] = jax.tree.map(lambda x: x + 0.05 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), x.shape)),
                                   adapted["lora"])  # B starts at zero: move it so the adapters matter
    merged = merge(adapted, lora)
    per_layer = unstack_layers(merged)
    assert rel_err(run(Idefics2(config, scan_layers=True), merged), run(Idefics2(config), per_layer)) < 1e-5
    assert not np.allclose(run(Idefics2(config), per_layer), expected)


def test_scanned_train_step_equals_unrolled(seed):
    model, _, batch = tiny_setup(seed, batch_size=2)
    tx = optax.sgd(0.1)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed))
    scanned = dataclasses.replace(model, scan_layers=True, remat=True)
    scanned_state = init_state(scanned, tx, mesh, jax.random.PRNGKey(seed))
    stacked = jax.tree.map(lambda x: x.copy(), stack_layers(state.params))  # the steps donate their state
    scanned_state = scanned_state.replace(params=stacked, opt_state=tx.init(stacked))
    data = global_batch({k: batch[k] for k in MODEL_KEYS}, mesh)
    new, metrics = make_train_step(model, tx, mesh)(state, data)
    new_scanned, metrics_scanned = make_train_step(scanned, tx, mesh)(scanned_state, data)
    assert abs(float(metrics["loss"]) - float(metrics_scanned["loss"])) < 1e-5 * abs(float(metrics["loss"]))
    ours, theirs = flat(unstack_layers(new_scanned.params)), flat(new.params)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert np.abs(ours[key] - value).max() <= 1e-5 * max(1.0, np.abs(value).max()), key
