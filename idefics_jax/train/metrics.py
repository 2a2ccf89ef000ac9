"""Training metrics: TensorBoard event files with a jsonl copy, reading them back, the loss-curve plot."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tensorboardX import SummaryWriter

from idefics_jax.paths import TreeUploader, as_path, is_url

log = logging.getLogger(__name__)


class MetricWriter:
    """TensorBoard event files (tensorboardX) and a jsonl copy for tools and plots, in a local
    directory or a gs:// one. A Cloud Storage object cannot be appended to, so there both are
    written locally and uploaded whole after each write (as TensorFlow's writers do on gs://), by a
    background thread (`paths.TreeUploader`): training does not wait on the network.

    resume_step: the step a resumed run restarts from: the rows an earlier run wrote past it (steps
    that will run again) are dropped from the jsonl, and TensorBoard is told to purge them."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.workdir = as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._local = None  # for a gs:// workdir: the local directory written, then uploaded
        self._uploader = None
        self._tb = None
        if enabled:
            if is_url(self.workdir):
                self._local = tempfile.mkdtemp(prefix="idefics_jax-metrics-")
                if self.path.exists():  # an earlier run's rows stay (a resumed run adds its own after them)
                    (Path(self._local) / "metrics.jsonl").write_bytes(self.path.read_bytes())
                self._uploader = TreeUploader(self._local, self.workdir)
            written = self._local or str(self.workdir)  # where the files are written (appended to)
            self._jsonl = os.path.join(written, "metrics.jsonl")
            if resume_step is not None and os.path.exists(self._jsonl):
                _drop_rows_after(self._jsonl, resume_step)
            self._tb = SummaryWriter(os.path.join(written, "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict[str, float]):
        if not self.enabled:
            return
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        if self._uploader:
            self._tb.flush()
            self._uploader.request()

    def close(self):
        if self._tb is None:
            return
        self._tb.flush()
        self._tb.close()
        self._tb = None
        if self._uploader:
            try:
                self._uploader.close()
            except Exception as error:  # noqa: BLE001 - a run that ends is not failed by its metrics' upload
                log.error("The metrics of this run could not be uploaded to %s (%s: %s); they are in %s",
                          self.workdir, type(error).__name__, error, self._local)
            else:
                shutil.rmtree(self._local, ignore_errors=True)


def _drop_rows_after(path: str, step: int):
    """Rewrites the jsonl at `path` without its rows past `step` (and a last line cut short)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".partial", "w") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"No metrics.jsonl in {workdir}: has a run written metrics there?")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not JSON ({line[:80]!r})") from None
            # the last line, cut short: a copy uploaded while a row was being written, or a kill
    last = {}
    for row in rows:  # a resumed run rewrites steps: keep the latest value of each
        last[(row["step"])] = {**last.get(row["step"], {}), **row}
    return [last[k] for k in sorted(last)]


def plot_loss(workdir: str | os.PathLike, out: str | os.PathLike | None = None, keys=("train/loss",)) -> str:
    """The loss curve as a PNG (default WORKDIR/loss.png, also in a gs:// workdir); returns its path."""
    import matplotlib  # heavy, and only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file backend

    rows = read_metrics(workdir)
    out = as_path(out, "Plot path") if out else as_path(workdir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out.write_bytes(png.getvalue())
    return str(out)
