"""Checkpoints of a training run: params, optimizer state, step, RNG and the data iterator together.

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
import orbax.checkpoint as ocp

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
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        errors = []
        for candidate in steps:
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: try the previous
                errors.append(f"step {candidate}: {type(error).__name__}: {str(error)[:300]}")
                log.warning("Checkpoint %s/%s cannot be restored (%s); trying the previous one",
                            self.directory, candidate, errors[-1])
                continue
            if errors:
                log.warning("Resumed from step %d instead of the latest: %s", candidate, "; ".join(errors))
            return candidate, restored["state"], dict(restored["data"] or {})
        raise RuntimeError(f"No checkpoint in {self.directory} can be restored: " + "; ".join(errors))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
