"""The train state, the loss and one optimizer step, sharded over a mesh.

    state = init_state(model, tx, mesh, rng)                  # params + optimizer state, placed
    step = make_train_step(model, tx, mesh, accum_steps=2)      # jitted, donates the old state
    state, metrics = step(state, batch)                         # batch: the packed dict, on device

Gradient accumulation runs `accum_steps` micro-batches in a `lax.scan` and divides the summed
loss by the total number of target tokens once, so it equals one step on the whole batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idefics_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, fit_shardings

MODEL_KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask", "pixel_values", "pixel_attention_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def cross_entropy(logits, targets, mask):
    """Summed token cross-entropy in float32 over `mask`, and the number of target tokens."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((log_z - picked) * mask), jnp.sum(mask)


def _forward_loss(model, params, batch, rng):
    logits = model.apply(
        {"params": params}, batch["tokens"], pixel_values=batch.get("pixel_values"),
        pixel_attention_mask=batch.get("pixel_attention_mask"), positions=batch["positions"],
        segment_ids=batch["segment_ids"], rngs={"neftune": rng}, train=True)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def abstract_state(model, tx, rng, example_ids=None):
    """The boxed (logically annotated) state as ShapeDtypeStructs."""
    example_ids = jnp.zeros((1, 1), jnp.int32) if example_ids is None else example_ids

    def init(rng):
        params = model.init(rng, example_ids)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return init, jax.eval_shape(init, rng)


def state_shardings(model, tx, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    init, abstract = abstract_state(model, tx, jax.random.PRNGKey(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    return init, fit_shardings(nn.meta.unbox(abstract), shardings)


def init_state(model, tx, mesh: Mesh, rng, rules=LOGICAL_AXIS_RULES) -> TrainState:
    """A fresh state, each array created directly with its sharding."""
    init, shardings = state_shardings(model, tx, mesh, rules)
    with mesh, nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch -> device arrays, batch axis over (data, fsdp)."""
    return {k: jax.device_put(batch[k], batch_sharding(mesh, batch[k].ndim)) for k in MODEL_KEYS if k in batch}


def make_train_step(model, tx, mesh: Mesh, *, accum_steps: int = 1, rules=LOGICAL_AXIS_RULES):
    _, shardings = state_shardings(model, tx, mesh, rules)

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(lambda p, b, r: _forward_loss(model, p, b, r), has_aux=True)

        if accum_steps == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

            def body(carry, xs):
                grads, loss_sum, count = carry
                b, r = xs
                (l, c), g = grad_fn(state.params, b, r)
                return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + c), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            rngs = jax.random.split(step_rng, accum_steps)
            (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, rngs))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "target_tokens": count, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    batch_shardings = {k: batch_sharding(mesh, 2) for k in MODEL_KEYS}
    batch_shardings["pixel_values"] = batch_sharding(mesh, 5)
    batch_shardings["pixel_attention_mask"] = batch_sharding(mesh, 4)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))

    def run(state, batch):
        with mesh, nn.logical_axis_rules(rules):
            return jitted(state, batch)

    return run
