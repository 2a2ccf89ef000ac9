"""Checkpoints of a training run: params, optimizer state, step, RNG and the data iterator together;
and the parameters alone, for inference and export.

An orbax `CheckpointManager` in `WORKDIR/checkpoints` saves asynchronously, keeps the last
`keep` checkpoints plus one every `keep_period` steps for good, and writes a step only when it
is complete (a kill during a save leaves the previous checkpoint as the latest). Restoring takes
the target's shardings, so a run resumes onto a different mesh. A latest checkpoint that cannot
be read falls back to the one before it, with a warning that names the problem. The directory may
be a gs:// URL (orbax commits a step there with a marker file instead of a rename).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idefics_jax.paths import as_path

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = as_path(directory, "Checkpoint directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state, data_state) of `step` (default: the latest readable one)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        candidate, restored = first_readable(self.manager, step, lambda s: args)
        return candidate, restored["state"], dict(restored["data"] or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def first_readable(manager: ocp.CheckpointManager, step: int | None, args_of) -> tuple[int, Any]:
    """(step, restored) of `step`, or of the latest step that can be restored with `args_of(step)`,
    each unreadable one skipped with a warning that names the problem."""
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}")
    errors = []
    for candidate in steps:
        try:
            restored = manager.restore(candidate, args=args_of(candidate))
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: try the previous
            errors.append(f"step {candidate}: {type(error).__name__}: {str(error)[:300]}")
            log.warning("Checkpoint %s/%s cannot be restored (%s); trying the previous one",
                        manager.directory, candidate, errors[-1])
            continue
        if errors:
            log.warning("Restored step %d instead of the latest: %s", candidate, "; ".join(errors))
        return candidate, restored
    raise RuntimeError(f"No checkpoint in {manager.directory} can be restored: " + "; ".join(errors))


def split_over_devices(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """An array's largest axis that the mesh's devices divide, split over all of them (replicated when
    none does): parameters spread evenly over any host or pod, whatever mesh they were saved from."""
    axes = sorted(range(len(shape)), key=lambda i: -shape[i])
    axis = next((i for i in axes if shape[i] % mesh.size == 0), None)
    spec = [None] * len(shape)
    if axis is not None:
        spec[axis] = mesh.axis_names
    return NamedSharding(mesh, PartitionSpec(*spec))


def restore_params(directory: str | os.PathLike, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of a training run's `directory` (WORKDIR/checkpoints): only the train state's
    `params` are read (no optimizer state, nothing built), each array split over all devices
    (`split_over_devices`). `step`: default the latest readable one."""
    directory = as_path(directory, "Checkpoint directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoint directory {directory}")
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                              "data": ocp.JsonCheckpointHandler()})
    mesh = Mesh(np.array(jax.devices()), ("devices",))
    try:
        def args_of(candidate):
            saved = manager.item_metadata(candidate)["state"]
            saved = getattr(saved, "tree", saved)["params"]
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                tuple(x.shape), x.dtype, sharding=split_over_devices(tuple(x.shape), mesh)), saved)
            item = {"params": abstract}
            return ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))

        step, restored = first_readable(manager, step, args_of)
    finally:
        manager.close()
    return step, restored["state"]["params"]
