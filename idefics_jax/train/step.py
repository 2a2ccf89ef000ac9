"""The train state, the loss and one optimizer step, sharded over a mesh.

    state = init_state(model, tx, mesh, rng)                  # params + optimizer state, placed
    step = make_train_step(model, tx, mesh, accum_steps=2)      # jitted, donates the old state
    state, metrics = step(state, batch)                         # batch: the packed dict, on device

Gradient accumulation runs `accum_steps` micro-batches in a `lax.scan` and divides the summed
loss by the total number of target tokens once, so it equals one step on the whole batch.
Micro-batch k takes rows k, k + accum_steps, ... so that every device feeds each micro-batch
from the rows it already holds (see `microbatches`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idefics_jax.models.lora import add_adapters, merge
from idefics_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, constrain, fit_shardings

MODEL_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "pixel_values", "pixel_attention_mask")


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


def _forward_loss(model, params, batch, rng, lora=None):
    if lora is not None:
        params = merge(params, lora)
    logits = model.apply(
        {"params": params}, batch["input_ids"], pixel_values=batch.get("pixel_values"),
        pixel_attention_mask=batch.get("pixel_attention_mask"), positions=batch["positions"],
        segment_ids=batch["segment_ids"], rngs={"neftune": rng}, train=True)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def abstract_state(model, tx, rng, lora=None):
    """(init function, the boxed (logically annotated) state as ShapeDtypeStructs)."""
    example_ids = jnp.zeros((1, 1), jnp.int32)

    def init(rng):
        params = model.init(rng, example_ids)["params"]
        if lora is not None:
            params = add_adapters(params, lora, jax.random.fold_in(rng, 1))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return init, jax.eval_shape(init, rng)


def state_shardings(model, tx, mesh: Mesh, rules=LOGICAL_AXIS_RULES, lora=None):
    init, abstract = abstract_state(model, tx, jax.random.PRNGKey(0), lora)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    return init, fit_shardings(nn.meta.unbox(abstract), shardings)


def init_state(model, tx, mesh: Mesh, rng, rules=LOGICAL_AXIS_RULES, lora=None) -> TrainState:
    """A fresh state, each array created directly with its sharding."""
    init, shardings = state_shardings(model, tx, mesh, rules, lora)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch -> device arrays, batch axis over (data, fsdp)."""
    return {k: jax.device_put(batch[k], batch_sharding(mesh, batch[k].ndim)) for k in MODEL_KEYS if k in batch}


def microbatches(batch: dict, accum_steps: int) -> dict:
    """`[batch, ...]` arrays -> `[accum_steps, batch / accum_steps, ...]`, micro-batch k holding rows
    k, k + accum_steps, k + 2 * accum_steps, ...

    The batch axis is split over (data, fsdp) in contiguous blocks, so strided micro-batches take
    the same number of rows from every device's block and the split moves no data. (Contiguous
    micro-batches would each live on a fraction of the devices, and the partitioner would gather
    them, replicating activations.) The sum over micro-batches, hence the step, is the same.
    """

    def split(x):  # [batch, ...] -> [accum, batch / accum, ...]
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, None, "activation_batch", *(None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def check_batch_size(batch_size: int, accum_steps: int, mesh: Mesh):
    """Each micro-batch must split evenly over the batch shards (mesh axes data x fsdp)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if accum_steps < 1:
        raise ValueError(f"config.optimizer.accum_steps={accum_steps} must be at least 1")
    if batch_size % (accum_steps * shards):
        raise ValueError(
            f"config.data.batch_size={batch_size} is not a multiple of config.optimizer.accum_steps="
            f"{accum_steps} x {shards} batch shards (mesh data x fsdp): every micro-batch must split "
            f"evenly over the devices. Change the batch size, accum_steps or the mesh.")


def train_step_fn(model, tx, *, accum_steps: int = 1, lora=None):
    """The step as a pure function `(state, batch) -> (state, metrics)`, not yet jitted."""

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(lambda p, b, r: _forward_loss(model, p, b, r, lora), has_aux=True)

        if accum_steps == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro = microbatches(batch, accum_steps)

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
        with jax.named_scope("optimizer"):  # named in the program, for profiles read per op class
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "target_tokens": count, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def make_train_step(model, tx, mesh: Mesh, *, accum_steps: int = 1, rules=LOGICAL_AXIS_RULES, lora=None,
                    shardings=None):
    """The step jitted for `mesh`: the new state keeps `shardings` (the state's; worked out from the
    model when not given), donating the old one."""
    if shardings is None:
        _, shardings = state_shardings(model, tx, mesh, rules, lora)
    step = train_step_fn(model, tx, accum_steps=accum_steps, lora=lora)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def compile(state, batch):  # the program `run` then uses (jit's cache holds it): compiled once
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, batch).compile()

    run.compile = compile
    return run


def memory_summary(compiled) -> str | None:
    """What one device holds for the compiled step, from XLA's buffer assignment (None where the
    backend does not say)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if m is None:
        return None
    gb = lambda n: f"{n / 1e9:.2f} GB"
    host = getattr(m, "host_temp_size_in_bytes", 0)
    return (f"{gb(m.argument_size_in_bytes)} of inputs (state and batch), {gb(m.temp_size_in_bytes)} of temporaries "
            f"(activations kept for the backward pass, gradients, workspace){f', {gb(host)} on the host' if host else ''}")
