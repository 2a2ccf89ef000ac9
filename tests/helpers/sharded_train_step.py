"""Run by test_train.py with 8 simulated CPU devices: one train step on several meshes (with
gradient accumulation, and with the stage configs' scanned + rematerialised layers) must give the
loss and parameters of the 1-device step, and a checkpoint saved on one mesh must restore onto
others. Every run starts from the same parameters, placed as a restore would place them."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers.training import open_gates, tiny_setup  # noqa: E402

from idefics_jax import Idefics2  # noqa: E402
from idefics_jax.models.scan import stack_layers, unstack_layers  # noqa: E402
from idefics_jax.sharding import make_mesh  # noqa: E402
from idefics_jax.checkpoints.train_state import Checkpointer, abstract_with_shardings  # noqa: E402
from idefics_jax.train.data import global_batch  # noqa: E402
from idefics_jax.train.step import init_state, make_train_step, state_shardings  # noqa: E402


def mesh_of(shape):
    return make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


def step(model, tx, batch, mesh, state, accum=1):
    """`state` (host arrays) placed on `mesh` as the train state's shardings say, then one step."""
    state = jax.device_put(jax.tree.map(np.array, state), state_shardings(model, tx, mesh)[1])  # a copy: donated
    return make_train_step(model, tx, mesh, accum_steps=accum)(state, global_batch(batch, mesh))


def restore_on_other_meshes(model, tx, state, workdir):
    """`state`, saved from a (2, 2, 2) mesh, restores onto (8, 1, 1) and (1, 1, 1) meshes."""
    saved = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(1, state, {})
    checkpointer.close()
    for shape in [(8, 1, 1), (1, 1, 1)]:
        other = mesh_of(shape)
        init, shardings = state_shardings(model, tx, other)
        abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0))
        _, restored, _ = Checkpointer(workdir).restore(abstract_with_shardings(abstract, shardings))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved)):
            if not np.array_equal(np.asarray(a), b):
                diff = np.abs(np.asarray(a, np.float64) - b).max()
                sys.exit(f"restore onto mesh {shape} changed {jax.tree_util.keystr(path)} (largest difference "
                         f"{diff:.3g}): {np.asarray(a).ravel()[:4]} vs saved {b.ravel()[:4]}")
        leaf = restored.params["model"]["text_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert leaf.sharding.mesh.shape == other.shape
        print(f"restored onto mesh {shape}")


def main(seed, workdir):
    model, tx, batch = tiny_setup(seed, batch_size=8, sgd=True)
    start = jax.tree.map(np.asarray, init_state(model, tx, mesh_of((1, 1, 1)), jax.random.PRNGKey(0)))
    state1, metrics = step(model, tx, batch, mesh_of((1, 1, 1)), start)
    loss1, params1 = float(metrics["loss"]), jax.tree.map(np.asarray, state1.params)
    update1 = jax.tree.map(np.subtract, params1, start.params)
    scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(update1))

    # the stage configs' layout: layers scanned and rematerialised, from the same (stacked) parameters
    scanned = Idefics2(model.config, scan_layers=True, remat=True)
    stacked_params = stack_layers(start.params)
    stacked = start.replace(params=stacked_params, opt_state=tx.init(stacked_params))
    runs = [(model, (8, 1, 1), 1), (model, (2, 4, 1), 1), (model, (2, 2, 2), 1), (model, (2, 2, 2), 2),
            (scanned, (2, 2, 2), 1)]
    for m, shape, accum in runs:
        name = " scanned + remat" if m is scanned else ""
        state, metrics = step(m, tx, batch, mesh_of(shape), stacked if m is scanned else start, accum)
        if shape == (2, 2, 2) and accum == 1 and m is model:
            restore_on_other_meshes(model, tx, state, workdir)
        loss, params = float(metrics["loss"]), jax.tree.map(np.asarray, state.params)
        params = unstack_layers(params) if m is scanned else params
        worst = max(float(np.abs(a - b - u).max())
                    for a, b, u in zip(jax.tree.leaves(params), jax.tree.leaves(start.params), jax.tree.leaves(update1)))
        worst_param = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1)))
        print(f"mesh {shape}{name} accum {accum}: loss {loss:.6f} vs {loss1:.6f}, worst relative update diff "
              f"{worst / scale:.2e} (of the largest update), {worst_param:.2e} absolute param diff")
        if abs(loss - loss1) > 1e-5 * abs(loss1) or worst > 1e-4 * scale or worst_param > 1e-5:
            sys.exit(f"mesh {shape}{name} accum {accum}: step differs from the 1-device step")
    # the other connectors, the cross-attention architecture (design choices) and Idefics3's Llama
    # decoder, on a (2, 2, 2) mesh
    for connector, architecture, model_type in (("mlp", "fully_autoregressive", "idefics2"),
                                                ("pixel_shuffle", "fully_autoregressive", "idefics2"),
                                                ("perceiver", "cross_attention", "idefics2"),
                                                ("pixel_shuffle", "fully_autoregressive", "idefics3")):
        model, tx, batch = tiny_setup(seed, batch_size=8, sgd=True, connector=connector, architecture=architecture,
                                      model_type=model_type)
        start = open_gates(jax.tree.map(np.asarray, init_state(model, tx, mesh_of((1, 1, 1)), jax.random.PRNGKey(0))))
        (one, m1), (eight, m8) = (step(model, tx, batch, mesh_of(shape), start) for shape in [(1, 1, 1), (2, 2, 2)])
        runs = [("", eight, m8)]
        if model_type == "idefics3":  # the Llama decoder also scanned and rematerialised
            scanned = Idefics2(model.config, scan_layers=True, remat=True)
            stacked_params = stack_layers(start.params)
            state, metrics = step(scanned, tx, batch, mesh_of((2, 2, 2)),
                                  start.replace(params=stacked_params, opt_state=tx.init(stacked_params)))
            runs.append((" scanned + remat", state.replace(params=unstack_layers(state.params)), metrics))
        for name, eight, m8 in runs:
            worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)))
            variant = f"connector {connector}, {architecture}, {model_type}{name}"
            print(f"{variant}, mesh (2, 2, 2): loss {float(m8['loss']):.6f} vs {float(m1['loss']):.6f}, "
                  f"{worst:.2e} absolute param diff")
            if abs(float(m8["loss"]) - float(m1["loss"])) > 1e-5 * abs(float(m1["loss"])) or worst > 1e-5:
                sys.exit(f"{variant}: the (2, 2, 2) step differs from the 1-device step")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
