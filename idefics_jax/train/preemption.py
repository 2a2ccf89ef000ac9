"""Stopping on a preemption notice (SIGTERM) with a checkpoint of the step reached.

Spot / preemptible TPU VMs and schedulers (Slurm, Kubernetes) send SIGTERM some seconds before
they take the machine. The training loop asks `watch.requested(step)` after every step; once it
says yes, the loop saves that step and ends, and running the same command again resumes from it.

On a Google Cloud VM the metadata server says so first: `instance/preempted` turns TRUE when a spot
VM's notice starts, and `instance/maintenance-event` announces TERMINATE_ON_HOST_MAINTENANCE ahead
of a maintenance that stops the VM (TPU VMs are never live-migrated). `MetadataWatch`, a background
thread, reads both each second and passes either on as a preemption notice: to the watch itself in
one process, as a SIGTERM to this process in several (JAX's service below listens for it). Off
Google Cloud its first request fails and it ends (`GCE_METADATA_HOST` names another server, as for
Google's client libraries).

- One process: a SIGTERM handler notes the notice (the previous handler is put back on `close`).
- Several processes (`jax.distributed`): a notice reaches one host, but saving is collective, so
  the hosts must stop at the same step. JAX's preemption service (on by default) catches SIGTERM
  on each host, shares the notice and agrees on a step;
  `multihost_utils.reached_preemption_sync_point(step)` is true on every host at that step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import urllib.error
import urllib.request

from jax._src import distributed  # the coordination service's client (no public accessor)
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process ended by SIGTERM reports: the run is not finished


class PreemptionWatch:
    def __init__(self, metadata: bool = True):
        """metadata: also watch a Google Cloud VM's metadata server (`MetadataWatch`)."""
        self.signalled = False
        self.stopped_at: int | None = None
        self._shared = distributed.global_state.client is not None  # JAX's service holds SIGTERM
        # a metadata notice: one process notes it here (from any thread); several pass it to JAX's
        # service as the SIGTERM it listens for
        notify = None if self._shared else (lambda: self._note(signal.SIGTERM, None))
        self.metadata = MetadataWatch(notify=notify) if metadata else None
        self._previous = None
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame):
        if not self.signalled:
            log.warning("Preemption notice: stopping after this step with a checkpoint of it")
        self.signalled = True

    def requested(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer on every host)."""
        if self._shared:
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.signalled
        if stop:
            self.stopped_at = step
        return stop

    def close(self):
        if self.metadata is not None:
            self.metadata.stop()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class MetadataWatch:
    """Reads a Google Cloud VM's metadata server every `interval` seconds in a daemon thread; on a
    preemption (`preempted` TRUE) or a terminating maintenance event, calls `notify` once (default:
    SIGTERM to this process). The thread ends at the first request that fails to connect (not on
    Google Cloud) and on `stop()`."""

    STOPPING_EVENTS = ("TERMINATE_ON_HOST_MAINTENANCE",)

    def __init__(self, host: str | None = None, interval: float = 1.0, notify=None):
        host = host or os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        self.url = f"http://{host}/computeMetadata/v1/instance/"
        self.interval = interval
        self.notify = notify or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.notice: str | None = None  # what was seen, once seen
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gce-preemption-watch", daemon=True)
        self._thread.start()

    def _get(self, key: str) -> str:
        request = urllib.request.Request(self.url + key, headers={"Metadata-Flavor": "Google"})
        with self._opener.open(request, timeout=5) as response:
            return response.read().decode().strip()

    def check(self) -> str | None:
        """The notice the server gives now, if any."""
        if self._get("preempted").upper() == "TRUE":
            return "preempted"
        event = self._get("maintenance-event")
        return f"maintenance event {event}" if event in self.STOPPING_EVENTS else None

    def _run(self):
        while not self._stop.is_set():
            try:
                notice = self.check()
            except urllib.error.HTTPError as e:
                if e.code != 503:  # 503: the server is in maintenance itself; retry
                    log.debug("metadata server at %s: %s; not watching it", self.url, e)
                    return
                notice = None
            except (OSError, ValueError) as e:  # no server: not a Google Cloud VM
                log.debug("no metadata server at %s (%s): not watching it", self.url, e)
                return
            if notice:
                self.notice = notice
                log.warning("Google Cloud metadata server: %s; stopping as on SIGTERM", notice)
                self.notify()
                return
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
