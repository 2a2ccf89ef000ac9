"""`python -m idefics_jax.ablate`: a grid of design choices trained and scored, one table; finished
runs skipped, an interrupted one resumed, a failing one named while the others go on."""

from __future__ import annotations

import json
from pathlib import Path

from idefics_jax.cli import ablate
from idefics_jax.data.synthetic_tasks import TASKS

CONFIGS = Path(__file__).parents[1] / "configs"


def write_grid(path: Path, data_dir: Path, points: str) -> Path:
    common = ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2", "train.eval_samples=6",
              "data.eval_source=tasks_eval", "data.synthetic_num=40", "data.batch_size=2", f"data.dir={data_dir}"]
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "    grid = ml_collections.ConfigDict()\n"
                    f"    grid.base = {str(CONFIGS / 'tiny.py')!r}\n"
                    "    grid.seeds = [0]\n"
                    f"    grid.common = {common!r}\n"
                    f"    grid.points = {' '.join(points.split())}\n"
                    "    return grid\n")
    return path


def test_a_grid_trains_scores_skips_and_resumes(tmp_path, capsys):
    points = """[
        {"name": "perceiver", "overrides": []},
        {"name": "pixel_shuffle", "overrides": ["model.connector=pixel_shuffle", "data.image_sizing=square"]},
        {"name": "no_pooling_keep_aspect", "overrides": ["model.connector=mlp"]},
        {"name": "cross_attention_frozen", "overrides": ["model.architecture=cross_attention",
                                                         "model.cross_attention_every=1", "train.regime=frozen",
                                                         "model.init_from={workdir}/perceiver/seed{seed}",
                                                         "model.init_towers=vision,text"]},
    ]"""
    grid = write_grid(tmp_path / "grid.py", tmp_path / "data", points)
    out = tmp_path / "runs"
    assert ablate.main(["--grid", str(grid), "--workdir", str(out)]) == 1  # the third point cannot run
    report = (out / "ablations.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    shuffled = json.loads((out / "pixel_shuffle" / "seed0" / "result.json").read_text())
    plain = json.loads((out / "perceiver" / "seed0" / "result.json").read_text())
    assert shuffled["image_tokens"] == 16 and plain["image_tokens"] == 4  # tiny: 4 latents; 8 x 8 patches / 4
    assert shuffled["trainable"] == shuffled["parameters"] and shuffled["parameters"] < plain["parameters"]
    assert set(plain["scores"]) == {"exact_match", "vqa_accuracy", "anls"} and plain["flops_per_sample"] > 0
    assert set(plain["tasks"]) == set(TASKS)  # the held-out tasks, one question each, scored apart
    assert all(f" {task} |" in report.splitlines()[4] for task in TASKS), report.splitlines()[4]
    crossed = json.loads((out / "cross_attention_frozen" / "seed0" / "result.json").read_text())
    assert crossed["image_tokens"] == 1 and 0 < crossed["trainable"] < crossed["parameters"]
    started = f"Started from {out / 'perceiver' / 'seed0'} (towers vision, text; the others fresh)"
    assert started in (out / "cross_attention_frozen" / "seed0" / "train.log").read_text()
    assert [step for step, _ in plain["losses"]] == [1, 2]
    assert "`model.connector=pixel_shuffle`" in rows["pixel_shuffle"] and "| 16 |" in rows["pixel_shuffle"]
    assert "failed: seed 0 exited with 1: error: config.model.connector=mlp" in rows["no_pooling_keep_aspect"]
    assert "takes square images" in rows["no_pooling_keep_aspect"]
    assert (out / "ablations.png").stat().st_size > 0
    log = out / "perceiver" / "seed0" / "train.log"
    size = log.stat().st_size
    (out / "pixel_shuffle" / "seed0" / "result.json").unlink()  # as if stopped before its summary
    assert ablate.main(["--grid", str(grid), "--workdir", str(out)]) == 1
    assert log.stat().st_size == size  # finished: not run again
    assert "Resumed from" in (out / "pixel_shuffle" / "seed0" / "train.log").read_text()
    assert json.loads((out / "pixel_shuffle" / "seed0" / "result.json").read_text())["losses"] == shuffled["losses"]


def test_bad_grids_are_named(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.py", tmp_path / "data", '[{"name": "a", "overrides": ["model.connector"]}]')
    assert ablate.main(["--grid", str(grid), "--workdir", str(tmp_path / "runs")]) == 2
    assert "override 'model.connector' is not KEY=VALUE" in capsys.readouterr().err
    grid = write_grid(tmp_path / "grid.py", tmp_path / "data", '[{"name": "a", "overrides": []}, {"name": "a", "overrides": []}]')
    assert ablate.main(["--grid", str(grid), "--workdir", str(tmp_path / "runs")]) == 2
    assert "unique names" in capsys.readouterr().err
    assert ablate.main(["--grid", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "runs")]) == 2
    assert "No grid file" in capsys.readouterr().err
