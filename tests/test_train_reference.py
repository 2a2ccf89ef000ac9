"""One training step against transformers': the loss and every parameter's gradient, float32.

The batch is padded (right-padded rows, as packed rows are), with a text-only row and a row of two
images of different sizes; labels are the next tokens, without padding and image tokens. Ours is the
training code itself (`train_step_fn`), with an optimizer that keeps the gradients it is given;
transformers' is `loss.backward()` on the same weights. Gradients are compared through the
conversion's name map (`checkpoints.names`), each against the larger of its own scale and a
thousandth of the largest gradient: some are zero in exact arithmetic (a key projection's bias moves
every score of a query alike), and both sides leave rounding noise there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util

from conftest import IMAGE_TOKEN_ID
from helpers.inputs import make_batch
from idefics_jax import Idefics2
from idefics_jax.checkpoints.names import hf_name, leaf_rule
from idefics_jax.train.step import TrainState, train_step_fn

TOL = 1e-4


def right_padded(input_ids, attention_mask):
    """make_batch's left-padded rows, moved to the left edge."""
    ids, mask = np.zeros_like(input_ids), np.zeros_like(attention_mask)
    for b in range(len(ids)):
        n = int(attention_mask[b].sum())
        ids[b, :n], mask[b, :n] = input_ids[b, -n:], 1
    return ids, mask


def keep_gradients() -> optax.GradientTransformation:
    """An 'optimizer' whose state becomes the gradients it is given, parameters unchanged."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_one_training_step_matches_transformers(hf_dir, converted, seed):
    config, params = converted
    rng = np.random.default_rng([seed, 7])
    rows = [([9, 6, 5], [(56, 40), (28, 52)]), ([31], []), ([4, 12], [(36, 36)])]
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(rng, rows, config.image_seq_len)
    input_ids, attention_mask = right_padded(input_ids, attention_mask)
    labels = np.where((attention_mask == 1) & (input_ids != IMAGE_TOKEN_ID), input_ids, -100)

    # transformers: the mean cross-entropy of the shifted labels, and its gradients
    model = hf_dir[1]
    model.zero_grad()
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                pixel_values=torch.tensor(pixel_values).permute(0, 1, 4, 2, 3),
                pixel_attention_mask=torch.tensor(pixel_mask), labels=torch.tensor(labels), use_cache=False)
    out.loss.backward()
    loss = float(out.loss.detach())
    reference = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # ours: the packed batch's form of the same rows, through the training step
    seq = input_ids.shape[1]
    next_labels = np.concatenate([labels[:, 1:], np.full((len(labels), 1), -100)], axis=1)
    batch = {"input_ids": input_ids.astype(np.int32), "segment_ids": attention_mask.astype(np.int32),
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), input_ids.shape) * attention_mask,
             "targets": np.maximum(next_labels, 0).astype(np.int32), "loss_mask": next_labels >= 0,
             "pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}
    tx = keep_gradients()
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(train_step_fn(Idefics2(config), tx))(state, jax.tree.map(jnp.asarray, batch))
    assert abs(float(metrics["loss"]) - loss) < TOL * loss, (float(metrics["loss"]), loss)
    assert int(metrics["target_tokens"]) == int((labels[:, 1:] >= 0).sum())

    ours = {}
    for path, grad in traverse_util.flatten_dict(new_state.opt_state).items():
        grad = np.asarray(grad)
        ours[hf_name(path, grad.ndim)] = leaf_rule(path[-1], grad.ndim).to_hf(grad)
    assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))[:5]
    scale = max(float(np.abs(g).max()) for g in reference.values())
    worst = {}
    for name, ref in reference.items():
        error = float(np.abs(ours[name] - ref).max()) / max(float(np.abs(ref).max()), 1e-3 * scale)
        worst[name] = error
    bad = {name: f"{error:.1e}" for name, error in worst.items() if error > TOL}
    assert not bad, bad
    assert np.abs(reference["model.text_model.layers.0.self_attn.q_proj.weight"]).max() > 0  # gradients flowed
