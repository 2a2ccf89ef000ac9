"""Run by test_train.py: train steps as one process, or as one of two jax.distributed processes
(started through launch/gpu_multihost.sh). Prints the losses as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from idefics_jax.distributed import initialize  # noqa: E402

initialize()  # IDEFICS_COORDINATOR / IDEFICS_NUM_PROCESSES / IDEFICS_PROCESS_ID, or one process

import jax  # noqa: E402

from idefics_jax.sharding import make_mesh  # noqa: E402
from idefics_jax.train.data import global_batch  # noqa: E402
from idefics_jax.train.step import MODEL_KEYS, init_state, make_train_step  # noqa: E402
from helpers.training import tiny_batch, tiny_setup  # noqa: E402


def main(seed):
    model, tx, _ = tiny_setup(seed, batch_size=4)
    mesh = make_mesh(-1, 1, 1)
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed))
    step = make_train_step(model, tx, mesh)
    rows = 4 // jax.process_count()
    start = jax.process_index() * rows
    losses = []
    for i in range(3):
        batch = tiny_batch(model.config, seed + i, 4)
        local = {k: batch[k][start:start + rows] for k in MODEL_KEYS}
        state, metrics = step(state, global_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(), "losses": losses}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
