"""Training metrics: FLOPs and MFU, TensorBoard event files, the loss-curve plot, and profiles.

FLOPs per step count the matmuls of every tower (6 x parameters x tokens for forward + backward)
plus attention's quadratic part: the vision tower over each image's patches, the Perceiver's
latents over [patches; latents], and the decoder's causal (and windowed) attention over each
packed segment.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from idefics_jax.config import Idefics2Config
from idefics_jax.paths import TreeUploader, as_path, is_url

log = logging.getLogger(__name__)

# bf16 dense peak FLOP/s per device, by jax `device_kind` substring
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device_kind: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def matmul_flops(config: Idefics2Config, patches: float, images: int, tokens: float) -> float:
    """Training FLOPs (forward + backward: 6 per weight and token) of every weight matrix, for
    `patches` real image patches in `images` images and `tokens` real text tokens. Each matrix counts
    the tokens it multiplies: the vision tower's and the modality projection's the patches, the
    Perceiver's queries, output and MLP its latents, its keys and values [patches; latents]."""
    v, p, t = config.vision, config.perceiver, config.text
    d, latents = t.hidden_size, images * p.resampler_n_latents
    vision = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * patches
    projection = (2 * v.hidden_size + d) * t.intermediate_size * patches  # gate, up: vision -> text MLP; down
    perceiver = p.resampler_depth * (
        (2 * d * p.resampler_n_heads * p.resampler_head_dim + 3 * d * 4 * d) * latents
        + 2 * d * p.num_key_value_heads * p.resampler_head_dim * (patches + latents))
    text_layer = d * t.attention_head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) \
        + 3 * d * t.intermediate_size
    text = (t.num_hidden_layers * text_layer + d * t.vocab_size) * tokens  # + the LM head
    return 6.0 * float(vision + projection + perceiver + text)


def dot_shapes(jaxpr, times: int = 1, out: dict | None = None) -> dict:
    """{(batch, m, k, n): count} of the `dot_general`s in a jaxpr and its sub-jaxprs (a scan's body
    counted `length` times; XLA's cost analysis counts a loop's body once). 2 * b * m * k * n FLOPs each."""
    from jax.extend.core import jaxprs_in_params

    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            size = lambda shape, dims: int(np.prod([shape[d] for d in dims], dtype=np.int64))
            free = lambda shape, used: int(np.prod([d for i, d in enumerate(shape) if i not in used], dtype=np.int64))
            key = (size(lhs, lb), free(lhs, (*lc, *lb)), size(lhs, lc), free(rhs, (*rc, *rb)))
            out[key] = out.get(key, 0) + times
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jaxprs_in_params(eqn.params):
            dot_shapes(sub, times * repeat, out)
    return out


def step_flops(config: Idefics2Config, batch: dict[str, Any]) -> float:
    """Training FLOPs (forward + backward) of one packed batch."""
    v, p, t = config.vision, config.perceiver, config.text
    patches = batch["pixel_attention_mask"][..., :: v.patch_size, :: v.patch_size]
    patch_counts = patches.reshape(*patches.shape[:2], -1).sum(-1)  # [batch, slots]
    n_images = int((patch_counts > 0).sum())
    tokens = float((batch["segment_ids"] > 0).sum())
    flops = matmul_flops(config, float(patch_counts.sum()), n_images, tokens)
    # attention: 2 matmuls of 2 * q * k * width each, x3 for forward + backward
    flops += 12 * v.num_hidden_layers * v.hidden_size * float((patch_counts**2).sum())
    flops += 12 * p.resampler_depth * p.resampler_n_heads * p.resampler_head_dim * p.resampler_n_latents * \
        float((patch_counts[patch_counts > 0] + p.resampler_n_latents).sum())
    window = t.sliding_window or 1 << 30
    width = t.num_attention_heads * t.attention_head_dim
    for row in batch["segment_ids"]:
        for segment in np.unique(row[row > 0]):
            n = int((row == segment).sum())
            pairs = sum(min(i + 1, window) for i in range(n)) if n <= 4 * window else n * window
            flops += 12 * t.num_hidden_layers * width * pairs
    return float(flops)


class MetricWriter:
    """TensorBoard event files (tensorboardX) and a jsonl copy for tools and plots, in a local
    directory or a gs:// one. A Cloud Storage object cannot be appended to, so there both are
    written locally and uploaded whole after each write (as TensorFlow's writers do on gs://), by a
    background thread (`paths.TreeUploader`): training does not wait on the network."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.workdir = as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._local = None  # for a gs:// workdir: the local directory written, then uploaded
        self._uploader = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            if is_url(self.workdir):
                self._local = tempfile.mkdtemp(prefix="idefics_jax-metrics-")
                if self.path.exists():  # an earlier run's rows stay (a resumed run adds its own after them)
                    (Path(self._local) / "metrics.jsonl").write_bytes(self.path.read_bytes())
                self._uploader = TreeUploader(self._local, self.workdir)
            written = self._local or str(self.workdir)  # where the files are written (appended to)
            self._jsonl = os.path.join(written, "metrics.jsonl")
            self._tb = SummaryWriter(os.path.join(written, "tensorboard"))

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


class StepProfiler:
    """A `jax.profiler` trace of steps `first` .. `first + count - 1` (1-based, as logged) into
    `directory` (`plugins/profile/<time>/<host>.xplane.pb`, read by XProf / TensorBoard's profile
    plugin, and a Perfetto `trace.json.gz`). `first=0`: off. Traced on process 0 only: every host
    runs the same program, and hosts with one name would write over each other's files. A gs://
    directory gets the files once the trace ends (written to a local directory first, uploaded from a
    background thread while training goes on; `close()` waits for the upload)."""

    def __init__(self, directory: str | os.PathLike, first: int, count: int, enabled: bool = True):
        if first < 0 or (first and count < 1):
            raise ValueError(f"config.train.profile_first_step={first} / profile_steps={count}: give a step "
                             f"(0: off) and at least one step to trace")
        self.directory, self.first, self.last = directory, first, first + count - 1
        self.enabled, self.active = enabled and first > 0, False
        self._local, self._uploader = None, None

    def before(self, step: int):
        """Call before running step `step`."""
        if self.enabled and step == self.first:
            import jax

            self._local = tempfile.mkdtemp(prefix="idefics_jax-profile-") if is_url(self.directory) else None
            jax.profiler.start_trace(self._local or str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> str | None:
        """Call after step `step` ran; returns the directory once the trace is written."""
        if self.active and step >= self.last:
            import jax

            jax.block_until_ready(outputs)  # the trace holds the last step's device work
            self._stop()
            return self.directory
        return None

    def _stop(self):
        if self.active:
            import jax

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
