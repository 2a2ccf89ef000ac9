"""Run by test_train.py with 8 simulated CPU devices: one train step on several meshes must give
the loss and parameters of the 1-device step."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import ACCUMULATION, tiny_setup  # noqa: E402

from idefics_jax import Idefics2  # noqa: E402
from idefics_jax.sharding import make_mesh  # noqa: E402
from idefics_jax.train.step import init_state, make_train_step  # noqa: E402


def run(mesh_shape, model, tx, batch, accum):
    """(loss, parameter updates) of one step on a mesh."""
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(model, tx, mesh, accum_steps=accum)
    from idefics_jax.train.loop import global_batch

    state, metrics = step(state, global_batch(batch, mesh))
    return float(metrics["loss"]), jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), \
        jax.tree.map(np.asarray, state.params)


def restore_on_other_meshes(model, tx, batch, workdir):
    """A checkpoint saved from a (2, 2, 2) mesh restores onto (8, 1, 1) and (1, 1, 1) meshes."""
    import flax.linen as nn

    from idefics_jax.train.checkpoint import Checkpointer, abstract_with_shardings
    from idefics_jax.train.loop import global_batch
    from idefics_jax.train.step import state_shardings

    mesh = make_mesh(2, 2, 2)
    state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
    state, _ = make_train_step(model, tx, mesh)(state, global_batch(batch, mesh))
    saved = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(1, state, {})
    checkpointer.close()
    for shape in [(8, 1, 1), (1, 1, 1)]:
        other = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        init, shardings = state_shardings(model, tx, other)
        abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0))
        _, restored, _ = Checkpointer(workdir).restore(abstract_with_shardings(abstract, shardings))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
            if not np.array_equal(np.asarray(a), b):
                sys.exit(f"restore onto mesh {shape} changed a value")
        leaf = restored.params["model"]["text_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert leaf.sharding.mesh.shape == other.shape
        print(f"restored onto mesh {shape}")


def main(seed, workdir=None):
    model, tx, batch = tiny_setup(seed, batch_size=8, sgd=True)
    if workdir:
        restore_on_other_meshes(model, tx, batch, workdir)
    # the stage configs' layout: layers scanned and rematerialised (its own parameters: losses compared)
    scanned = Idefics2(model.config, scan_layers=True, remat=True)
    one, sharded = (run(shape, scanned, tx, batch, 1)[0] for shape in [(1, 1, 1), (2, 2, 2)])
    print(f"mesh (2, 2, 2) scanned + remat: loss {sharded:.6f} vs {one:.6f}")
    if abs(sharded - one) > 1e-5 * abs(one):
        sys.exit("mesh (2, 2, 2), scanned + remat: loss differs from the 1-device step")
    loss1, update1, params1 = run((1, 1, 1), model, tx, batch, accum=1)
    scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(update1))
    for shape, accum in [((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((2, 2, 2), 2)]:
        if accum > 1:  # the test reads the partitioner's warnings up to here (see test_train.py)
            print(ACCUMULATION, file=sys.stderr, flush=True)
        loss, update, params = run(shape, model, tx, batch, accum)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(update1)))
        worst_param = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1)))
        print(f"mesh {shape} accum {accum}: loss {loss:.6f} vs {loss1:.6f}, worst relative param diff "
              f"{worst / scale:.2e} (of the largest update), {worst_param:.2e} absolute")
        if abs(loss - loss1) > 1e-5 * abs(loss1) or worst > 1e-4 * scale or worst_param > 1e-5:
            sys.exit(f"mesh {shape}: step differs from the 1-device step")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
