"""Rematerialisation policies (idefics_jax/models/remat.py): each keeps what it names, the offloaded
ones keep it in host memory, and none changes the gradients."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idefics_jax import Idefics2
from idefics_jax.models.remat import POLICIES, remat_policy
from idefics_jax.models.scan import stack_layers, unstack_layers
from helpers.inputs import make_batch


@pytest.fixture(scope="module")
def setup(converted, seed):
    config, params = converted
    rng = np.random.default_rng([seed, 900])
    ids, mask, pixels, pixel_mask = make_batch(rng, [([4, 3], [(40, 36)]), ([9, 5], [(28, 52)])], config.image_seq_len)
    targets = rng.integers(0, config.text.vocab_size, ids.shape)

    def loss(model):
        def f(p):
            logits = model.apply({"params": p}, ids, attention_mask=mask, pixel_values=pixels,
                                 pixel_attention_mask=pixel_mask)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
            return -jnp.sum(logp * mask) / mask.sum()
        return f
    return config, params, loss


def residuals(f, params) -> list[str]:
    """What the backward pass of `f` keeps from its forward pass, one line each (jax's own listing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, params)
    return out.getvalue().splitlines()


def test_policies_keep_what_they_name(setup):
    config, params, loss = setup
    layers = config.text.num_hidden_layers + config.vision.num_hidden_layers + config.perceiver.resampler_depth
    kept = {policy: residuals(loss(Idefics2(config, remat=policy)), params) for policy in POLICIES}
    count = lambda policy, text: sum(text in line for line in kept[policy])
    # products of a weight (flat_dot_general): kept per layer by "minimal"; outside the layers (modality
    # projection, LM head) by every policy
    products = {policy: count(policy, "(flat_dot_general)") for policy in POLICIES}
    assert products["none"] > products["minimal"] > products["full"] == products["save_qkv_proj"] > 0
    for name in ("query_proj", "key_proj", "value_proj"):  # every attention's projections, by name
        assert count("save_qkv_proj", f"named '{name}'") == layers
        assert count("full", f"named '{name}'") == count("minimal", f"named '{name}'") == 0
    assert len(kept["full"]) < len(kept["save_qkv_proj"]) < len(kept["minimal"]) < len(kept["none"])
    # the offloaded policies keep as many, in host memory (moved there in the forward pass and back for
    # the backward: `f32<host>[...]` values put there in the gradient's program)
    to_host = re.compile(r"<host>\[[\d,]*\] = device_put")
    on_host = {policy: len(to_host.findall(str(jax.make_jaxpr(jax.grad(loss(Idefics2(config, remat=policy))))(params))))
               for policy in ("minimal", "minimal_offloaded", "qkv_proj_offloaded")}
    assert len(kept["minimal_offloaded"]) == len(kept["minimal"])
    assert len(kept["qkv_proj_offloaded"]) == len(kept["save_qkv_proj"])
    assert on_host["minimal"] == 0
    assert on_host["qkv_proj_offloaded"] == 3 * layers
    assert on_host["minimal_offloaded"] == products["minimal"] - products["full"]


def test_offloaded_scanned_layers_give_the_same_gradients(setup):
    """The most involved case: products kept in host memory, from layers under `nn.scan` (jax computes
    every policy's backward pass from the same forward; this checks our layers' wiring, e.g. the
    stacked parameters' gradients). `full` is checked by tests/sharded_train_step.py."""
    config, params, loss = setup
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    expected = flat(jax.jit(jax.grad(loss(Idefics2(config))))(params))
    model = Idefics2(config, remat="minimal_offloaded", scan_layers=True)
    got = flat(unstack_layers(jax.jit(jax.grad(loss(model)))(stack_layers(params))))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_policy_names():
    assert remat_policy(True) == "full" and remat_policy(False) == "none"
    with pytest.raises(ValueError, match=r"did you mean 'save_qkv_proj'"):
        remat_policy("save_qkv")
