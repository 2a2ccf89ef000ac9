"""Scan over layers: the same model as the unrolled layers (the scanned + rematerialised train
step is checked against the unrolled one in tests/sharded_train_step.py, on a (2, 2, 2) mesh)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from conftest import rel_err
from idefics_jax import Idefics2
from idefics_jax.models.scan import stack_layers, unstack_layers
from idefics_jax.models.lora import LoraConfig, add_adapters, merge
from helpers.inputs import make_batch


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
    on_host = stack_layers(jax.tree.map(np.asarray, params))  # a checkpoint being loaded stays on the host
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(on_host))

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
