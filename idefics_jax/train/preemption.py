"""Stopping on a preemption notice (SIGTERM) with a checkpoint of the step reached.

Spot / preemptible TPU VMs and schedulers (Slurm, Kubernetes) send SIGTERM some seconds before
they take the machine. The training loop asks `watch.requested(step)` after every step; once it
says yes, the loop saves that step and ends, and running the same command again resumes from it.

- One process: a SIGTERM handler notes the notice (the previous handler is put back on `close`).
- Several processes (`jax.distributed`): a notice reaches one host, but saving is collective, so
  the hosts must stop at the same step. JAX's preemption service (on by default) catches SIGTERM
  on each host, shares the notice and agrees on a step;
  `multihost_utils.reached_preemption_sync_point(step)` is true on every host at that step.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process ended by SIGTERM reports: the run is not finished


class PreemptionWatch:
    def __init__(self):
        from jax._src import distributed

        self.signalled = False
        self.stopped_at: int | None = None
        self._shared = distributed.global_state.client is not None  # JAX's service holds SIGTERM
        self._previous = None
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame):
        if not self.signalled:
            log.warning("SIGTERM received: stopping after this step with a checkpoint of it")
        self.signalled = True

    def requested(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer on every host)."""
        if self._shared:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.signalled
        if stop:
            self.stopped_at = step
        return stop

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
