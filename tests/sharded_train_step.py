"""Run by test_train.py with 8 simulated CPU devices: one train step on several meshes must give
the loss and parameters of the 1-device step."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_setup  # noqa: E402

from idefics_jax.sharding import make_mesh  # noqa: E402
from idefics_jax.train.step import init_state, make_train_step  # noqa: E402


def run(mesh_shape, model, tx, batch, accum):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(0))
    step = make_train_step(model, tx, mesh, accum_steps=accum)
    from idefics_jax.train.loop import global_batch

    state, metrics = step(state, global_batch(batch, mesh))
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


def main(seed):
    model, tx, batch = tiny_setup(seed, batch_size=8)
    loss1, params1 = run((1, 1, 1), model, tx, batch, accum=1)
    for shape, accum in [((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((2, 2, 2), 2)]:
        loss, params = run(shape, model, tx, batch, accum)
        worst = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
                    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1)))
        print(f"mesh {shape} accum {accum}: loss {loss:.6f} vs {loss1:.6f}, worst relative param diff {worst:.2e}")
        if abs(loss - loss1) > 1e-5 * abs(loss1) or worst > 1e-5:
            sys.exit(f"mesh {shape}: step differs from the 1-device step")


if __name__ == "__main__":
    main(int(sys.argv[1]))
