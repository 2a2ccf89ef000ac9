"""A `jax.profiler` trace of chosen training steps, local or uploaded to a gs:// workdir."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
from etils import epath

from idefics_jax.paths import TreeUploader, as_path, is_url
from idefics_jax.train.profile_summary import HLO_FILE

log = logging.getLogger(__name__)


class StepProfiler:
    """A `jax.profiler` trace of steps `first` .. `first + count - 1` (1-based, as logged) into
    `directory` (`plugins/profile/<time>/<host>.xplane.pb`, read by XProf / TensorBoard's profile
    plugin, and a Perfetto `trace.json.gz`), with the compiled step's text (`save_program`) for
    `profile_summary`. `first=0`: off. Traced on process 0 only: every host
    runs the same program, and hosts with one name would write over each other's files. A gs://
    directory gets the files once the trace ends (written to a local directory first, uploaded from a
    background thread while training goes on; `close()` waits for the upload)."""

    def __init__(self, directory: str | os.PathLike, first: int, count: int, enabled: bool = True):
        if first < 0 or (first and count < 1):
            raise ValueError(f"config.train.profile_first_step={first} / profile_steps={count}: give a step "
                             f"(0: off) and at least one step to trace")
        self.directory, self.first, self.last = directory, first, first + count - 1
        self.enabled, self.active = enabled and first > 0, False
        self._local, self._uploader, self._program_saved = None, None, False

    def before(self, step: int):
        """Call before running step `step`."""
        if self.enabled and step == self.first:
            self._local = tempfile.mkdtemp(prefix="idefics_jax-profile-") if is_url(self.directory) else None
            jax.profiler.start_trace(self._local or str(self.directory))
            self.active, self._program_saved = True, False

    def save_program(self, program: Callable[[], str]):
        """Writes the compiled step's text (`program()`, asked once per trace) beside the trace as
        `step.hlo.txt`: `python -m idefics_jax.train.profile_summary DIR` reads the two together."""
        if self.active and not self._program_saved:
            self._program_saved = True
            directory = epath.Path(self._local or str(self.directory))
            directory.mkdir(parents=True, exist_ok=True)  # the trace's files come at its end
            (directory / HLO_FILE).write_text(program())

    def after(self, step: int, outputs: Any) -> str | None:
        """Call after step `step` ran; returns the directory once the trace is written."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the trace holds the last step's device work
            self._stop()
            return self.directory
        return None

    def _stop(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._local:
                self._uploader = TreeUploader(self._local, as_path(self.directory, "Profile directory"))
                self._uploader.request()

    def close(self):
        """Stops a trace still running and waits for the upload to a gs:// directory (a failed one is
        logged: the files stay in the local directory named)."""
        self._stop()
        if self._uploader:
            uploader, self._uploader = self._uploader, None
            try:
                uploader.close()
            except Exception as error:  # noqa: BLE001 - a run that ends is not failed by its profile's upload
                log.error("The profile could not be uploaded to %s (%s: %s); it is in %s", self.directory,
                          type(error).__name__, error, self._local)
            else:
                shutil.rmtree(self._local, ignore_errors=True)
