"""Command line: train and score a grid of the paper's design choices, one table at the end.

    python -m idefics_jax.ablate --grid configs/ablations/cpu.py --workdir DIR [--set train.steps=6000 ...]

A grid file's `get_config()` returns an `ml_collections.ConfigDict`:

    base     the training config file of every point (relative to the grid file)
    seeds    the training seeds each point runs with (the data order is the base's `data.seed`
             for every point and seed: every point sees the same samples)
    common   overrides for every point, as `KEY=VALUE` strings (`train.steps=300`)
    points   a list of `{"name": ..., "overrides": ["model.connector=mlp", ...]}`

Every point and seed trains in its own process, exactly as `python -m idefics_jax.train --config
BASE --workdir DIR/NAME/seedS --config.KEY=VALUE ...` (the common overrides, then the point's, then
`--set`'s, then `train.seed=S`), scoring the base's held-out data (`data.eval_source`) at the end.
Points run in order, and in an override `{workdir}` stands for DIR and `{seed}` for the seed, so a
point can start from an earlier one's towers (`model.init_from={workdir}/base/seed{seed}` with
`model.init_towers=vision,text`).
A finished run leaves `result.json`: running the command again skips it, and a run that was
interrupted resumes from its checkpoint. `DIR/ablations.md` gets a row per point (its switches,
visual tokens per image, trainable and total parameters, training FLOPs per sample, step time,
final loss and held-out scores, overall and per task where the held-out records name their task,
as mean +- standard deviation over the seeds) and
`DIR/ablations.png` the loss curves and the scores. A run that fails is named with its error and
the others go on; a preemption notice stops the grid (run it again to go on).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from idefics_jax.checkpoints.workdir import training_config
from idefics_jax.cli.common import USER_ERRORS
from idefics_jax.sharding import make_mesh
from idefics_jax.train.metrics import read_metrics
from idefics_jax.train.optimizer import count_trainable
from idefics_jax.train.preemption import EXIT_CODE
from idefics_jax.train.run import build_run

SCORES = ("exact_match", "vqa_accuracy", "anls")
TASK = "eval/task/"  # the metrics of held-out records that name their task: exact match per task


def load_grid(path: str) -> tuple[ml_collections.ConfigDict, Path]:
    """The grid file's config, checked, and its base config's path."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No grid file at {path}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = module.get_config()
    unknown = sorted(set(grid.keys()) - {"base", "seeds", "common", "points"})
    if unknown:
        raise ValueError(f"{path}: unknown grid key(s) {unknown}; a grid has base, seeds, common and points")
    base = (file.parent / grid.base).resolve()
    if not base.is_file():
        raise FileNotFoundError(f"{path}: its base config {grid.base} is not a file ({base})")
    names = [point["name"] for point in grid.points]
    if not names or len(set(names)) != len(names) or not all(n and "/" not in n for n in names):
        raise ValueError(f"{path}: points need unique names without '/', got {names}")
    for point in grid.points:
        check_overrides(point["overrides"], f"{path}: point {point['name']}: override")
    return grid, base


def check_overrides(overrides, what: str):
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"{what} {override!r} is not KEY=VALUE")


def run_command(base: Path, workdir: Path, overrides: list[str], seed: int) -> list[str]:
    return [sys.executable, "-m", "idefics_jax.train", f"--config={base}", f"--workdir={workdir}",
            *(f"--config.{o}" for o in overrides), f"--config.train.seed={seed}"]


def summarize(workdir: Path) -> dict:
    """A finished run's numbers, from its saved config, metrics and model."""
    config = training_config(workdir)
    run = build_run(config, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))  # shapes only: nothing is placed
    params = run.abstract.params
    rows = read_metrics(workdir)
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    last = [loss for _, loss in losses[-max(1, len(losses) // 10):]]  # the last tenth of the logged steps
    perf = lambda key: float(np.median([r[key] for r in rows if key in r])) if any(key in r for r in rows) else None
    last_eval = next((r for r in reversed(rows) if "eval/exact_match" in r), {})
    scores = {k: last_eval[f"eval/{k}"] for k in SCORES if f"eval/{k}" in last_eval}
    tasks = {k[len(TASK):]: v for k, v in last_eval.items() if k.startswith(TASK)}
    return {"losses": losses, "final_loss": float(np.mean(last)), "step_time_s": perf("perf/step_time_s"),
            "flops_per_sample": perf("perf/flops_per_sample"), "scores": scores, "tasks": tasks,
            "image_tokens": run.model_config.image_seq_len, "image_features": run.model_config.image_features_len,
            "trainable": int(run.count_trainable(params)),
            "parameters": int(count_trainable(params))}  # every parameter: none frozen


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def task_names(results: dict[str, list[dict]]) -> list[str]:
    return sorted({t for runs in results.values() for r in runs for t in r.get("tasks", {})})


def table(grid, results: dict[str, list[dict]], failed: dict[str, str]) -> str:
    tasks = task_names(results)
    columns = ["point", "switches", "image tokens", "trainable / total params", "GFLOPs per sample", "step (s)",
               "final loss", *SCORES, *tasks]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for point in grid.points:
        name, runs = point["name"], results.get(point["name"], [])
        cells = [name, ", ".join(f"`{o}`" for o in point["overrides"]) or "(base)"]
        if runs:
            first, flops = runs[0], runs[0]["flops_per_sample"]
            features = first.get("image_features", first["image_tokens"])
            tokens = str(first["image_tokens"]) + (f" (+{features} cross-attended)" if features != first["image_tokens"] else "")
            cells += [tokens, f"{first['trainable']:,} / {first['parameters']:,}",
                      f"{flops / 1e9:.3g}" if flops is not None else "-", mean_std(r["step_time_s"] for r in runs),
                      mean_std(r["final_loss"] for r in runs),
                      *(mean_std(r["scores"].get(k) for r in runs) for k in SCORES),
                      *(mean_std(r.get("tasks", {}).get(t) for r in runs) for t in tasks)]
        else:
            cells += ["-"] * (len(columns) - 2)
        if name in failed:
            cells[-1] += f" (failed: {failed[name]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grid, results: dict[str, list[dict]], out: Path):
    """The loss curves (mean over seeds) and the held-out exact match per point (mean, with the spread
    over seeds): overall, and per task where the held-out records name their tasks."""
    import matplotlib  # heavy, and only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file backend

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [p["name"] for p in grid.points if results.get(p["name"])]
    for name in names:
        steps = [s for s, _ in results[name][0]["losses"]]
        mean = np.mean([[loss for _, loss in r["losses"]][:len(steps)] for r in results[name]], axis=0)
        curves.plot(steps, mean, label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    groups = [("all", lambda r: r["scores"].get("exact_match", np.nan))]
    groups += [(t, lambda r, t=t: r.get("tasks", {}).get(t, np.nan)) for t in task_names(results)]
    width = 0.8 / len(groups)
    for g, (label, value) in enumerate(groups):
        scores = [[value(r) for r in results[n]] for n in names]
        bars.bar(np.arange(len(names)) + g * width, [np.mean(s) for s in scores], width,
                 yerr=[np.std(s) for s in scores], capsize=2, label=label)
    bars.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("held-out exact match")
    if len(groups) > 1:
        bars.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="a grid file (configs/ablations/*.py)")
    parser.add_argument("--workdir", required=True, help="a local directory for every run and the table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every point, after the grid's (e.g. train.steps=6000); repeatable")
    args = parser.parse_args(argv)
    try:
        grid, base = load_grid(args.grid)
        check_overrides(args.set, "--set")
        root = Path(args.workdir).resolve()
        root.mkdir(parents=True, exist_ok=True)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    for point in grid.points:
        for seed in grid.seeds:
            workdir = root / point["name"] / f"seed{seed}"
            done = workdir / "result.json"
            if not done.exists():
                overrides = [o.replace("{workdir}", str(root)).replace("{seed}", str(seed))
                             for o in [*grid.common, *point["overrides"], *args.set]]
                print(f"{point['name']} seed {seed}: training in {workdir}", flush=True)
                workdir.mkdir(parents=True, exist_ok=True)
                with open(workdir / "train.log", "a") as log:
                    code = subprocess.call(run_command(base, workdir, overrides, seed), stdout=log,
                                           stderr=subprocess.STDOUT)
                if code == EXIT_CODE:
                    print(f"Stopped on a preemption notice during {point['name']} seed {seed}; run the same "
                          f"command to go on", file=sys.stderr)
                    return EXIT_CODE
                if code != 0:
                    tail = (workdir / "train.log").read_text().strip().splitlines()[-1:] or ["no output"]
                    failed[point["name"]] = f"seed {seed} exited with {code}: {tail[0]} (see {workdir}/train.log)"
                    print(f"{point['name']} seed {seed} failed: {failed[point['name']]}", file=sys.stderr)
                    continue
                done.write_text(json.dumps(summarize(workdir)))
            results.setdefault(point["name"], []).append(json.loads(done.read_text()))
    report = (f"# Ablations: {args.grid}\n\nBase `{base.name}`, seeds {list(grid.seeds)}, for every point: "
              + (", ".join(f"`{o}`" for o in [*grid.common, *args.set]) or "no overrides")
              + ". Mean ± standard deviation over the seeds; scores on the base's held-out data.\n\n"
              + table(grid, results, failed) + "\n")
    (root / "ablations.md").write_text(report)
    if results:
        plot(grid, results, root / "ablations.png")
    print(report)
    return 1 if failed else 0
