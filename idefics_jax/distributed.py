"""`jax.distributed` set-up that fails fast, with a message, when hosts or devices do not match.

    initialize()                                   # single host: nothing to do
    initialize("10.0.0.1:1234", 4, process_id)     # explicit (GPU hosts, launch/gpu_multihost.sh)
    initialize()  # on a Cloud TPU pod or under Slurm: jax finds the coordinator itself

Environment variables work too: IDEFICS_COORDINATOR, IDEFICS_NUM_PROCESSES, IDEFICS_PROCESS_ID.

Also here: `use_compilation_cache`, the persistent cache of compiled programs that every command
line turns on, the check that every host sees the same workdir, and `FromLeader`,
which passes what process 0 reads (a chat's input) to the other processes.
"""

from __future__ import annotations

import logging
import os
import secrets

import jax
import numpy as np
from etils import epath
from jax._src import distributed as jax_distributed  # the coordination service's client (no public accessor)
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    pass


def _auto_cluster() -> bool:
    """A cluster jax.distributed can discover by itself (Cloud TPU pod, Slurm, Open MPI)."""
    return bool(os.environ.get("IDEFICS_AUTO_DISTRIBUTED") == "1" or
                os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or
                int(os.environ.get("SLURM_NTASKS", "1")) > 1 or
                int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300, cpu_collectives: str = "gloo") -> None:
    coordinator = coordinator or os.environ.get("IDEFICS_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _int_env("IDEFICS_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("IDEFICS_PROCESS_ID")
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise DistributedError(
            f"A multi-host run needs all of coordinator, num_processes and process_id; got "
            f"coordinator={coordinator}, num_processes={num_processes}, process_id={process_id}")
    if coordinator is None and not _auto_cluster():
        return  # one process
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id} is outside 0..{num_processes - 1}")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - say what was tried
        raise DistributedError(
            f"jax.distributed.initialize failed (coordinator={coordinator or 'auto'}, num_processes="
            f"{num_processes or 'auto'}, process_id={process_id if process_id is not None else 'auto'}): {error}. "
            "Check that every host runs the same command, the coordinator's port is reachable, and the "
            "process count matches the hosts started.") from error
    check_topology(num_processes)


DEFAULT_COMPILATION_CACHE = "~/.cache/idefics_jax/jax"


def use_compilation_cache(path: str | os.PathLike | None = DEFAULT_COMPILATION_CACHE) -> str | None:
    """Keeps compiled programs in `path` (JAX's persistent compilation cache, for programs that take
    a second or more to compile), so that a resumed training run or a repeated command skips XLA's
    compilation: minutes for the 8B model's train step. A cache directory set through JAX itself
    (`JAX_COMPILATION_CACHE_DIR`) wins; `""` or None leaves the cache off. Call before the program
    compiles; returns the directory in use (None: off). The cache is trusted code: keep it private."""
    current = jax.config.jax_compilation_cache_dir
    if current or not path:
        return current or None
    path = os.path.expanduser(os.fspath(path))
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def check_topology(expected_processes: int | None = None) -> None:
    """Every host must see the same number of local devices, and the expected process count."""
    if expected_processes is not None and jax.process_count() != expected_processes:
        raise DistributedError(f"Expected {expected_processes} processes, jax sees {jax.process_count()}")
    local = jax.local_device_count()
    if jax.device_count() != local * jax.process_count():
        raise DistributedError(
            f"Uneven hosts: this one has {local} devices, but {jax.device_count()} devices over "
            f"{jax.process_count()} processes is not {local} per host")
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), local, jax.device_count())


def check_shared_directory(path: epath.Path) -> None:
    """With several processes, `path` (local or gs://) must be one directory that all of them see
    (orbax writes each checkpoint from every host into it): process 0 writes a token there and
    every process reads it back. Raises DistributedError in every process, naming those that do not
    see it."""
    if jax.process_count() == 1:
        return
    marker = path / ".idefics_shared_check"
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    if jax.process_index() == 0:
        marker.write_text(str(token))
    multihost_utils.sync_global_devices("idefics_jax: shared directory marker written")
    try:
        sees = marker.read_text() == str(token)
    except Exception as error:  # noqa: BLE001 - a missing file, or a bucket this host may not read
        log.warning("Process %d cannot read %s: %s", jax.process_index(), marker, error)
        sees = False
    seen = np.asarray(multihost_utils.process_allgather(np.int32(sees))).reshape(-1)  # every process has read
    if jax.process_index() == 0:
        marker.unlink()
    if not seen.all():
        blind = [int(i) for i in np.flatnonzero(seen == 0)]
        raise DistributedError(
            f"{path} is not one directory shared by the hosts: process(es) {blind} do not see the file process 0 "
            f"wrote there. Checkpoints are written by every host into it: use a gs:// bucket (with credentials "
            f"on every host) or a shared filesystem (NFS, Filestore) mounted at the same path on every host")


class FromLeader:
    """Bytes from process 0 to every process, one message after another, through jax.distributed's
    key-value store. No device collective takes part, so the other processes can wait as long as
    process 0 does, e.g. for a person typing. In one process it returns what it is given.

        share = FromLeader("chat")
        line = share(sys.stdin.buffer.readline() if jax.process_index() == 0 else None)
    """

    WAIT_MS = 60_000  # each wait; the others wait again until process 0 sends or the job ends

    def __init__(self, name: str):
        self.name, self.sent = name, 0

    def __call__(self, message: bytes | None) -> bytes:
        """Process 0 passes its message (the others pass None); every process returns it."""
        if jax.process_count() == 1:
            return message
        client = jax_distributed.global_state.client
        key = f"idefics_jax/{self.name}/{self.sent}"
        self.sent += 1
        if jax.process_index() == 0:
            client.key_value_set_bytes(key, bytes(message))
            return bytes(message)
        while True:
            try:
                return client.blocking_key_value_get_bytes(key, self.WAIT_MS)
            except jax.errors.JaxRuntimeError as error:
                if "DEADLINE_EXCEEDED" not in str(error):
                    raise


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
