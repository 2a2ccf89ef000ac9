"""Checkpoints of a training run: params, optimizer state, step, RNG and the data iterator together;
and the parameters alone, for inference and export.

An orbax `CheckpointManager` in `WORKDIR/checkpoints` saves asynchronously, keeps the last
`keep` checkpoints plus one every `keep_period` steps for good, and writes a step only when it
is complete (a kill during a save leaves the previous checkpoint as the latest). Restoring takes
the target's shardings, so a run resumes onto a different mesh. The directory may be a gs:// URL
(orbax commits a step there with a marker file instead of a rename).

Every step proves its contents: once orbax has committed it, the size and CRC-32 of each of its
files go to `STEP/checksums.json` (in the background, by process 0), and every restore checks them
first (training, `restore_params` for inference and export alike). A step that fails the check, or
cannot be read, falls back to the one before it with a warning naming the step and the file; the
training run's `Checkpointer` moves it aside to `DIR_corrupt/STEP` (kept for inspection, no longer
counted among the kept steps, never restored again). A step without checksums (saved by an older
version, or by a run killed in the moment between the commit and the checksums) is restored with
a warning that it could not be verified.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idefics_jax.paths import as_path

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # in each step's directory: {relative path: [bytes, crc32]} of its other files
_CHUNK = 16 << 20


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose files differ from the checksums recorded when it was saved."""


def _crc32(path: epath.Path) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return size, crc


def _files(step_dir: epath.Path) -> list[str]:
    """Every file under `step_dir` but the checksums (and a half-written copy of them), as paths
    relative to it."""
    return sorted(str((directory / name).relative_to(step_dir)) for directory, _, names in step_dir.walk()
                  for name in names if name not in (CHECKSUMS, CHECKSUMS + ".partial"))


def _own_crc(sums: dict) -> int:
    """The CRC-32 of a checksum table, written beside it: a byte flipped in checksums.json itself
    (a file name garbled, a number changed) is then named as such, not as a file gone missing."""
    return zlib.crc32(json.dumps(sums, sort_keys=True).encode())


def seal(step_dir: epath.Path):
    """Writes `step_dir/checksums.json`: the size and CRC-32 of every other file of the step."""
    sums = {name: list(_crc32(step_dir / name)) for name in _files(step_dir)}
    partial = step_dir / (CHECKSUMS + ".partial")  # a reader never sees half a file
    partial.write_text(json.dumps({"crc32": sums, "own_crc32": _own_crc(sums)}, indent=0))
    partial.rename(step_dir / CHECKSUMS)


def verify(step_dir: epath.Path) -> bool:
    """Checks `step_dir` against its checksums: True when they match, False when it has none;
    raises `CorruptCheckpoint` naming the first file that is missing or differs."""
    if not (step_dir / CHECKSUMS).exists():
        return False
    try:
        table = json.loads((step_dir / CHECKSUMS).read_text())
        sums = table["crc32"]
        recorded = {name: (int(size), int(crc)) for name, (size, crc) in sums.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpoint(f"{step_dir}: its {CHECKSUMS} cannot be read ({error})") from error
    if "own_crc32" in table and table["own_crc32"] != _own_crc(sums):  # older steps were sealed without it
        raise CorruptCheckpoint(f"{step_dir}: its {CHECKSUMS} differs from what was saved (its own CRC-32)")
    for name, (size, crc) in recorded.items():
        if not (step_dir / name).exists():
            raise CorruptCheckpoint(f"{step_dir}: {name} is missing")
        if _crc32(step_dir / name) != (size, crc):
            raise CorruptCheckpoint(f"{step_dir}: {name} differs from what was saved (size or CRC-32)")
    extra = sorted(set(_files(step_dir)) - set(recorded))
    if extra:
        raise CorruptCheckpoint(f"{step_dir}: {extra[0]} was not part of the checkpoint when it was saved")
    return True


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = as_path(directory, "Checkpoint directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._unsealed: int | None = None  # the step saved last, until its checksums are written
        self._sealing: threading.Thread | None = None

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
        self.seal_committed(wait=True)  # orbax waits for the previous save in any case
        if self._sealing is not None:  # its checksums written before orbax may delete a step
            self._sealing.join()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._unsealed = step
            self.seal_committed()
        return saved

    def seal_committed(self, wait: bool = False):
        """Once the step saved last is committed (at once when `wait`), writes its checksums in a
        background thread. Cheap to call after every training step."""
        if self._unsealed is None:
            return
        if wait:
            self.manager.wait_until_finished()
        elif self.manager.is_saving_in_progress():
            return
        step, self._unsealed = self._unsealed, None
        if jax.process_index() == 0:
            if self._sealing is not None:
                self._sealing.join()
            self._sealing = threading.Thread(target=self._seal, args=(step,), name=f"checksums-{step}")
            self._sealing.start()

    def _seal(self, step: int):
        try:
            seal(self.step_directory(step))
        except Exception as error:  # noqa: BLE001 - training goes on; the step is restored unverified
            log.warning("Could not write the checksums of checkpoint step %d: %s", step, error)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state, data_state) of `step` (default: the latest readable one whose files match
        their checksums; one that does not is moved aside)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        candidate, restored = first_readable(self.manager, step, lambda s: args, on_corrupt=self._move_aside)
        return candidate, restored["state"], dict(restored["data"] or {})

    def _move_aside(self, step: int):
        """Moves a corrupt step to `DIR_corrupt/STEP` (process 0; every process then forgets it)."""
        aside = self.directory.parent / f"{self.directory.name}_corrupt" / str(step)
        if jax.process_index() == 0:
            try:
                aside.parent.mkdir(parents=True, exist_ok=True)
                while aside.exists():
                    aside = aside.parent / f"{aside.name}_"
                self.step_directory(step).rename(aside)
                log.warning("Moved the corrupt checkpoint of step %d to %s", step, aside)
            except OSError as error:
                log.error("Could not move the corrupt checkpoint %s aside (%s); it stays, and is checked and "
                          "skipped at every restore", self.step_directory(step), error)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def wait(self):
        """Waits until the last save is committed and its checksums are written."""
        self.seal_committed(wait=True)
        self.manager.wait_until_finished()
        if self._sealing is not None:
            self._sealing.join()

    def close(self):
        self.wait()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def first_readable(manager: ocp.CheckpointManager, step: int | None, args_of,
                   on_corrupt: Callable[[int], None] | None = None) -> tuple[int, Any]:
    """(step, restored) of `step`, or of the latest step whose files match their checksums and that
    can be restored with `args_of(step)`, each other one skipped with a warning that names the
    problem (and, when its checksums do not match, handed to `on_corrupt`)."""
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}")
    errors = []
    for candidate in steps:
        try:
            checked = _verified_everywhere(epath.Path(manager.directory) / str(candidate))
        except CorruptCheckpoint as error:
            errors.append(f"step {candidate}: {error}")
            log.warning("Checkpoint step %d is corrupt (%s); trying the previous one", candidate, error)
            if on_corrupt is not None:
                on_corrupt(candidate)
            continue
        if not checked:
            log.warning("Checkpoint %s/%s has no %s (saved by an older version, or just before a kill): "
                        "restored without verifying its contents", manager.directory, candidate, CHECKSUMS)
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


def _verified_everywhere(step_dir: epath.Path) -> bool:
    """`verify(step_dir)`, read by process 0 alone and its verdict shared with every process."""
    if jax.process_count() == 1:
        return verify(step_dir)
    verdict, message = 1, ""
    if jax.process_index() == 0:
        try:
            verdict = int(verify(step_dir))
        except CorruptCheckpoint as error:
            verdict, message = -1, str(error)
    verdict = int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
    if verdict < 0:
        raise CorruptCheckpoint(message or f"{step_dir}: its files differ from their checksums (see process 0's log)")
    return bool(verdict)


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
