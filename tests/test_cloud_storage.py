"""Cloud Storage, against an emulator: a gs:// workdir resumes from the bucket exactly and serves
generation, plots and profiles; data in a bucket (jsonl, ArrayRecord, TFDS) gives the batches the
same data gives from local disk; bad URLs are named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import xla_flags
from idefics_jax.paths import as_path, upload_tree
from helpers.training import load_config


def tiny(steps: int, data_dir, seed: int):
    c = load_config("tiny")
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 1, 1
    c.data.synthetic_num, c.data.batch_size, c.data.seq_len, c.data.seed = 60, 4, 256, seed
    c.data.dir, c.data.eval_source = str(data_dir), ""
    return c


def test_training_in_a_bucket_resumes_exactly_and_serves(gcs_bucket, tmp_path, seed, monkeypatch):
    import os
    import signal

    from idefics_jax.checkpoints import load as load_for_inference
    from idefics_jax.train.loop import train
    from idefics_jax.train.metrics import plot_loss, read_metrics
    from idefics_jax.train.preemption import PreemptionWatch

    data = tmp_path / "data"
    expected = train(tiny(3, data, seed), tmp_path / "local")
    # the bucket's runs read a copy of that run's data (jsonl, images as files) from the bucket
    bucket_data = f"{gcs_bucket}/data/{seed}"
    upload_tree(data, as_path(bucket_data))
    run = f"{gcs_bucket}/runs/{seed}"
    first = tiny(3, bucket_data, seed)
    first.train.profile_first_step, first.train.profile_steps = 2, 1
    asked = PreemptionWatch.requested

    def preempted_in_step_2(watch, step):  # a real SIGTERM, to this process, as step 2 ends
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return asked(watch, step)

    monkeypatch.setattr(PreemptionWatch, "requested", preempted_in_step_2)
    stopped = train(first, run)
    assert [s for s, _ in stopped["history"]] == [1, 2] and stopped["preempted_at"] == 2
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with it
    # a save killed half way: step 3's files without orbax's commit marker, which resuming ignores
    step2, step3 = as_path(f"{run}/checkpoints/2"), as_path(f"{run}/checkpoints/3")
    (step3 / "state").mkdir(parents=True, exist_ok=True)
    (step3 / "state" / "_METADATA").write_bytes((step2 / "state" / "_METADATA").read_bytes())
    resumed = train(tiny(3, bucket_data, seed), run)
    assert resumed["history"] == expected["history"][2:]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(run)] == expected["history"]

    bucket = as_path(run)
    assert list((bucket / "tensorboard").glob("events.out.tfevents.*"))
    assert list((bucket / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert plot_loss(run) == f"{run}/loss.png"
    assert (bucket / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_for_inference(run)  # the tokenizer comes from the bucket too
    assert loaded.description.endswith("at step 3") and loaded.tokenizer.vocab_size == expected_vocab(data)
    for ours, trained in zip(*(jax_leaves(t) for t in (loaded.params, resumed["state"].params))):
        np.testing.assert_array_equal(ours, trained)
    # --export_hf into the bucket: the weights, the run's tokenizer and image sizes, as the workdir serves
    # them; from a run on several slices too (its config's mesh cannot be made here: the weights are
    # read onto this host's devices, no mesh of the run's built)
    from idefics_jax.checkpoints import export_hf

    several_slices = tiny(3, bucket_data, seed)
    several_slices.mesh.dcn_data = 2
    (bucket / "config.json").write_text(several_slices.to_json_best_effort(indent=2))
    assert export_hf(run, f"{run}/hf") == 3
    exported = load_for_inference(f"{run}/hf")
    assert exported.config == loaded.config and exported.image_processor == loaded.image_processor
    assert exported.tokenizer.model_proto == loaded.tokenizer.model_proto
    for ours, trained in zip(*(jax_leaves(t) for t in (exported.params, loaded.params))):
        np.testing.assert_array_equal(ours, trained)

    # evaluate: the workdir, the questions (their images files) and the report all in the bucket
    from idefics_jax.cli import evaluate

    report = f"{run}/eval/report.json"
    assert evaluate.main(["--checkpoint", run, "--data", f"{bucket_data}/conversations_eval", "--limit", "3",
                          "--batch_size", "2", "--max_new_tokens", "2", "--output", report]) == 0
    scored = json.loads(as_path(report).read_text())
    assert scored["n"] == 3 and scored["failed"] == 0 and scored["checkpoint"].endswith("at step 3")
    assert not as_path(f"{report}.partial.jsonl").exists()


def expected_vocab(data) -> int:
    from idefics_jax.data.tokenizer import Tokenizer

    return Tokenizer(data / "tokenizer.model").vocab_size


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_evaluation_progress_in_a_bucket_survives_a_stop(gcs_bucket):
    """`evaluate`'s results as they come, in a bucket (rewritten whole per batch: no appends there):
    a later run with the same settings finds every whole batch, one with others finds none."""
    from idefics_jax.inference.evaluate import ProgressFile

    path = f"{gcs_bucket}/eval/stopped.json.partial.jsonl"
    results = [{"id": i, "prediction": f"answer {i}"} for i in range(5)]
    first = ProgressFile(path, {"batch_size": 2}, 2)
    first.start([])
    first.append(results[:2])
    first.append(results[2:4])
    first.append(results[4:])  # a last batch cut short by the stop: counted as not done
    assert ProgressFile(path, {"batch_size": 2}, 2).done() == results[:4]
    assert ProgressFile(path, {"batch_size": 3}, 2).done() == []
    again = ProgressFile(path, {"batch_size": 2}, 2)
    again.start(again.done())
    again.append([{"id": 4, "prediction": "answer 4, again"}])
    assert as_path(path).read_text().splitlines()[1:] == [json.dumps(r) for r in results[:4]] + \
        ['{"id": 4, "prediction": "answer 4, again"}']
    again.remove()
    assert not as_path(path).exists()


def test_metrics_upload_in_the_background_and_survive_failures(gcs_bucket, seed, monkeypatch, caplog):
    """A gs:// workdir's metrics are uploaded by a thread: a slow upload does not hold up `write`, a
    failed one is logged and retried by the next, unchanged files are not sent again, and when the
    last upload fails the rows stay in the local directory, which the error names."""
    import threading
    import time

    from idefics_jax import paths
    from idefics_jax.train.metrics import MetricWriter, read_metrics

    put, sent, fail = paths._put, [], threading.Event()

    def slow_put(source, target):
        time.sleep(0.3)
        if fail.is_set():
            raise OSError("the network is down")
        sent.append(target.name)
        put(source, target)

    monkeypatch.setattr(paths, "_put", slow_put)
    run = f"{gcs_bucket}/metrics/{seed}"
    writer = MetricWriter(run)
    began = time.perf_counter()
    for step in range(1, 4):
        writer.write(step, {"train/loss": 1.0 / step})
    assert time.perf_counter() - began < 0.3  # the first upload (two files, 0.6 s) has not ended yet
    fail.set()
    time.sleep(1.0)
    writer.write(4, {"train/loss": 0.25})
    time.sleep(1.0)  # at most one more upload runs, and fails
    fail.clear()
    writer.write(5, {"train/loss": 0.2})
    writer.close()
    assert "retrying at the next write" in caplog.text and "the network is down" in caplog.text
    assert [(r["step"], r["train/loss"]) for r in read_metrics(run)] == [(s, 1.0 / s) for s in range(1, 6)]
    count = len(sent)
    writer._uploader.upload()  # nothing changed since the last: nothing is sent
    assert len(sent) == count

    caplog.clear()
    writer = MetricWriter(run)  # a resumed run: its rows come after the earlier ones
    fail.set()
    writer.write(6, {"train/loss": 1 / 6})
    writer.close()  # nothing is lost: the local copy is kept, and named
    assert "could not be uploaded" in caplog.text
    local = caplog.text.split("they are in ")[1].split()[0]
    assert [r["step"] for r in read_metrics(local)] == [1, 2, 3, 4, 5, 6]


def test_two_processes_train_into_one_bucket(gcs_bucket, seed):
    """Two jax.distributed processes (hosts) train into one gs:// workdir, the parameters split over
    both (fsdp): both pass the shared-workdir check, write their parts of each checkpoint, which
    process 0 commits; the workdir then serves, and both export it to the bucket together."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import portpicker

    from idefics_jax.checkpoints import load as load_for_inference
    from idefics_jax.train.metrics import read_metrics

    root = Path(__file__).parents[1]
    run = f"{gcs_bucket}/two-hosts/{seed}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())  # the emulator's variables included
    port = portpicker.pick_unused_port()
    command = lambda i: [
        "bash", str(root / "launch" / "gpu_multihost.sh"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", str(i), "--", sys.executable, "-m", "idefics_jax.train", "--config",
        str(root / "configs" / "tiny.py"), "--workdir", run, "--config.train.steps=2", "--config.train.checkpoint_every=1",
        "--config.train.log_every=1", "--config.data.synthetic_num=60", "--config.data.batch_size=4",
        "--config.data.seq_len=256", f"--config.data.seed={seed % 1000}", "--config.data.eval_source=",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    procs = [subprocess.Popen(command(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    steps = as_path(f"{run}/checkpoints")
    assert sorted(int(d.name) for d in steps.iterdir() if d.name.isdigit()) == [1, 2]
    loaded = load_for_inference(run)
    assert loaded.description.endswith("at step 2")
    # both hosts export: the parameters are split over them (fsdp), gathered tensor by tensor
    procs = [subprocess.Popen([*command(i), "--export_hf", f"{run}/hf"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and f"Exported step 2 of {run}" in out, err[-3000:]
    exported = load_for_inference(f"{run}/hf")
    assert exported.tokenizer.model_proto == loaded.tokenizer.model_proto
    for ours, trained in zip(*(jax_leaves(t) for t in (exported.params, loaded.params))):
        np.testing.assert_array_equal(ours, trained)


def test_checkpoints_in_a_bucket_convert_and_load(gcs_bucket, sp_model, seed, tmp_path):
    """A Hugging Face checkpoint in a bucket, converted to ours and back by the command line from
    bucket to bucket (the processor files travel along): each loads for inference from the bucket
    as the local original does, and the safetensors written to the bucket are those written to
    disk. A corrupt shard in the bucket is named."""
    from conftest import HF_TINY, build_hf_model
    from idefics_jax.checkpoints import CheckpointError
    from idefics_jax.cli.convert import main as convert
    from idefics_jax.data.tokenizer import Tokenizer
    from idefics_jax.checkpoints import load as load_for_inference

    tokenizer = Tokenizer(sp_model[1])
    text = {**HF_TINY["text_config"], "vocab_size": tokenizer.vocab_size}
    local = tmp_path / "hf"
    build_hf_model(seed, text_config=text, image_token_id=tokenizer.token_id("<image>")).save_pretrained(local)
    (local / "tokenizer.model").write_bytes(sp_model[1])
    (local / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 56, "shortest_edge": 28}}))
    root = f"{gcs_bucket}/checkpoints/{seed}"
    upload_tree(local, as_path(f"{root}/hf"))
    assert convert(["from-hf", f"{root}/hf", f"{root}/ours"]) == 0
    assert convert(["to-hf", f"{root}/ours", f"{root}/back", "--max-shard-size", "100KB"]) == 0
    assert convert(["to-hf", f"{root}/ours", str(tmp_path / "back"), "--max-shard-size", "100KB"]) == 0

    reference = load_for_inference(local)
    for kind in ("hf", "ours", "back"):
        loaded = load_for_inference(f"{root}/{kind}")
        assert loaded.config == reference.config and loaded.image_processor == reference.image_processor
        assert loaded.tokenizer.model_proto == reference.tokenizer.model_proto
        for ours, theirs in zip(jax_leaves(loaded.params), jax_leaves(reference.params)):
            np.testing.assert_array_equal(ours, theirs)
    shards = sorted(as_path(f"{root}/back").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in (tmp_path / "back").iterdir()) == \
        sorted(p.name for p in as_path(f"{root}/back").iterdir())
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "back" / shard.name).read_bytes()

    shards[-1].write_bytes(shards[-1].read_bytes()[:50])  # cut short
    with pytest.raises(CheckpointError, match=f"{shards[-1]} is not a readable safetensors file"):
        load_for_inference(f"{root}/back")


def test_urls_that_cannot_serve_are_named(gcs_bucket, tmp_path):
    from idefics_jax.checkpoints import load as load_for_inference
    from idefics_jax.train.data import prepare_data

    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        as_path("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match="Checkpoint directory gs://idefics-test/empty does not exist"):
        load_for_inference(f"{gcs_bucket}/empty")
    config = tiny(1, f"{gcs_bucket}/nothing", 0)
    with pytest.raises(ValueError, match="config.data.dir=gs://idefics-test/nothing holds no tokenizer.model, and "
                                         "synthetic data is generated on local disk"):
        prepare_data(config, as_path(tmp_path))
    config.data.synthetic, config.data.tokenizer = False, f"{gcs_bucket}/nothing/tokenizer.model"
    with pytest.raises(FileNotFoundError, match="Tokenizer gs://idefics-test/nothing/tokenizer.model not found"):
        prepare_data(config, as_path(tmp_path))
    config.data.dir = "gs://no-such-bucket/data"
    with pytest.raises(FileNotFoundError, match="config.data.dir gs://no-such-bucket/data: bucket gs://no-such-bucket"):
        prepare_data(config, as_path(tmp_path))


@pytest.fixture(scope="module")
def synthetic_in_bucket(gcs_bucket, tmp_path_factory, seed):
    """(local synthetic data in every format, the same uploaded to the bucket)."""
    from idefics_jax.data.synthetic import generate

    local = tmp_path_factory.mktemp("synthetic")
    generate(local, num=40, seed=seed % 1000, num_eval=10, vocab_size=600)
    remote = as_path(f"{gcs_bucket}/synthetic/{seed}")
    upload_tree(local, remote)
    return local, remote


@pytest.mark.parametrize("fmt,workers", [("jsonl", 0), ("array_record", 1), ("tfds", 0)])
def test_data_in_a_bucket_gives_the_local_batches(synthetic_in_bucket, fmt, workers):
    """workers=1: the records are read in a grain worker process, with its own readers (one worker
    gives the batches of none)."""
    from helpers.pipelines import make_pipeline

    local, remote = synthetic_in_bucket
    reference, _ = make_pipeline(local, fmt=fmt)
    ours, _ = make_pipeline(remote, fmt=fmt, num_workers=workers)  # its tokenizer is read from the bucket too
    for _ in range(3):
        a, b = next(reference), next(ours)
        for key in ("input_ids", "loss_mask", "pixel_values", "image_segment_ids"):
            np.testing.assert_array_equal(a[key], b[key])


def test_questions_in_a_bucket(synthetic_in_bucket):
    from idefics_jax.data.image_processing import load_image
    from idefics_jax.inference.evaluate import load_records

    local, remote = synthetic_in_bucket
    for fmt in ("", "array_record/", "tfds/"):
        ours, base_dir = load_records(f"{remote}/{fmt}conversations_eval", limit=4)
        reference, local_dir = load_records(local / f"{fmt}conversations_eval", limit=4)
        assert str(base_dir).startswith("gs://") and len(ours) == 4
        where = lambda records: [{k: v for k, v in r.items() if k != "_at"} for r in records]  # their places differ
        assert where(ours) == where(reference)  # embedded images (ArrayRecord, TFDS) included
        assert ours.fingerprint() == ours.fingerprint() != reference.fingerprint()
        if not fmt:  # jsonl: images are files beside it, read from the bucket
            ref = next(r for r in ours if r.get("images"))["images"][0]
            np.testing.assert_array_equal(np.asarray(load_image(base_dir / ref)),
                                          np.asarray(load_image(local_dir / ref)))
            with pytest.raises(FileNotFoundError):
                load_image(base_dir / "no-such-image.png")


def test_prepare_script_reads_and_writes_buckets(synthetic_in_bucket, gcs_bucket, seed, capsys):
    import importlib.util
    from pathlib import Path

    from idefics_jax.data.sources import ArrayRecordSource, JsonlSource, TfdsSource

    spec = importlib.util.spec_from_file_location("prepare", Path(__file__).parents[1] / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    local, remote = synthetic_in_bucket
    out = f"{gcs_bucket}/prepared/{seed}"
    assert prepare.main(["array_record", f"{remote}/documents", f"{out}/ar", "--shards", "2"]) == 0
    assert prepare.main(["tfds", f"{remote}/documents", f"{out}/tfds"]) == 0
    assert f"Wrote the TFDS build {out}/tfds/" in capsys.readouterr().out
    reference = JsonlSource(local / "documents")
    for ours in (ArrayRecordSource(f"{out}/ar"), TfdsSource(f"{out}/tfds")):
        assert len(ours) == len(reference)
        for i in (0, len(ours) - 1):  # images embedded: read from the bucket's image files
            record = ours[i]
            assert record.pop("_image_bytes") == {record["image"]: (local / "documents" / record["image"]).read_bytes()}
            assert record.pop("_at") == f"{out}/{'ar' if isinstance(ours, ArrayRecordSource) else 'tfds'}#{i}"
            assert record == {k: v for k, v in reference[i].items() if k != "_at"}
    assert len(list(as_path(f"{out}/ar").glob("*.array_record"))) == 2


def test_published_data_in_a_bucket(gcs_bucket, tmp_path, seed):
    """The Cauldron's Parquet files, PDFA's tar shards and OBELICS with its image store read from
    gs:// as from local files (a bucket's tar shard is indexed in memory: nothing is written beside
    it; an image store's index is written beside the store, once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers.published import (CAULDRON, OBELICS, cauldron_rows, encoded, img2dataset_store, obelics_row, pdf_of,
                                   pdfa_ocr, write_tar)
    from idefics_jax.data.image_store import ImageStore
    from idefics_jax.data.sources import TableSource, TarSource

    rng = np.random.default_rng([seed, 34])
    rows, _ = cauldron_rows(rng, 6)
    (tmp_path / "cauldron").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON), tmp_path / "cauldron" / "train-00000.parquet",
                   row_group_size=3)
    (tmp_path / "pdfa").mkdir()
    write_tar(tmp_path / "pdfa" / "shard-0.tar", [("a.pdf", pdf_of(2, rng)), ("a.json", pdfa_ocr([["one"], ["two"]]))])
    images = {f"https://img.example.com/{k}.png": encoded(rng, "PNG") for k in range(3)}
    img2dataset_store(tmp_path / "images", "webdataset", images, [])
    (tmp_path / "obelics").mkdir()
    pq.write_table(pa.Table.from_pylist([obelics_row([("text", "A"), ("image", url)]) for url in images], schema=OBELICS),
                   tmp_path / "obelics" / "train-00000.parquet")
    remote = as_path(f"{gcs_bucket}/published/{seed}")
    upload_tree(tmp_path, remote)
    place = lambda records: [{k: v for k, v in r.items() if k not in ("_at",)} for r in records]
    for local, bucket in [(TableSource(tmp_path / "cauldron", "parquet"), TableSource(remote / "cauldron", "parquet")),
                          (TarSource(tmp_path / "pdfa", dpi=36), TarSource(remote / "pdfa", dpi=36)),
                          (TableSource(tmp_path / "obelics", "parquet", image_store=tmp_path / "images"),
                           TableSource(remote / "obelics", "parquet", image_store=remote / "images"))]:
        assert len(bucket) == len(local) > 0
        ours, theirs = ([s[i] for i in range(len(s))] for s in (bucket, local))
        for a, b in zip(place(ours), place(theirs)):
            pages = a.pop("_image_bytes", {}), b.pop("_image_bytes", {})
            assert a == b and pages[0] == pages[1]  # bytes, or the same rendered page (PIL compares pixels)
    assert not (remote / "pdfa" / "shard-0.tar.index.json").exists()
    assert (remote / "images" / "url_index" / "meta.json").exists()  # the store's index, written beside it
    assert ImageStore(remote / "images").get(next(iter(images))) == next(iter(images.values()))


def test_prepare_converts_published_files_into_a_bucket_and_resumes(gcs_bucket, tmp_path, seed):
    """Parquet files -> ArrayRecord shards in a bucket, each uploaded when complete with its counts
    last: a run killed after the first file resumes from the bucket's state."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers.published import CAULDRON, cauldron_rows
    from idefics_jax.data.sources import ArrayRecordSource

    rng = np.random.default_rng([seed, 39])
    rows, good = cauldron_rows(rng, 8)
    (tmp_path / "cauldron").mkdir()
    for k, part in enumerate([rows[:6], rows[6:]]):
        pq.write_table(pa.Table.from_pylist(part, schema=CAULDRON), tmp_path / "cauldron" / f"train-0000{k}.parquet")
    out = as_path(f"{gcs_bucket}/converted/{seed}")
    run = lambda: subprocess.run([sys.executable, str(Path(__file__).parents[1] / "data" / "prepare.py"), "array_record",
                                  str(tmp_path / "cauldron"), str(out), "--workers", "2"], capture_output=True, text=True,
                                 timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    done = run()
    assert done.returncode == 0 and "from 2 files (0 converted before)" in done.stdout, done.stderr[-3000:]
    (out / "train-00001.parquet.array_record.summary.json").unlink()  # as if killed before its counts landed
    again = run()
    assert again.returncode == 0 and "from 2 files (1 converted before)" in again.stdout, again.stderr[-3000:]
    assert len(ArrayRecordSource(out)) == good + 1  # the row with undecodable image bytes fits the schema
