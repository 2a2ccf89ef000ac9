"""Training: sharded steps equal the 1-device step, frozen towers, accumulation, kill and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import xla_flags
from idefics_jax.sharding import make_mesh
from idefics_jax.train.data import global_batch
from idefics_jax.models.lora import tower_of
from idefics_jax.train.step import init_state, make_train_step
from helpers.training import flip_bytes, tiny_setup

ROOT = Path(__file__).parents[1]


def one_step(model, tx, batch, accum=1, seed=0):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = make_train_step(model, tx, mesh, accum_steps=accum)(state, global_batch(batch, mesh))
    return before, jax.tree.map(np.asarray, state.params), metrics


def test_sharded_step_on_eight_simulated_devices_equals_one_device(seed, tmp_path):
    """Also: a checkpoint saved from one mesh restores onto others, and the SPMD partitioner finds a
    layout for every op. It warns when it can only replicate a tensor, as it did for embedding
    lookups in an `embed`-split table on (2, 2, 2) and (2, 4, 1) meshes, with scanned layers for the
    gather of `embed`-split image features, and with accumulation for contiguous micro-batches.
    Compiled afresh (no cache), so that the partitioner runs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "helpers" / "sharded_train_step.py"), str(seed),
                             str(tmp_path / "ckpt")], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("worst relative update diff") == 5, result.stdout
    assert "scanned + remat accum 1: loss" in result.stdout and "(2, 2, 2) accum 2: loss" in result.stdout
    assert result.stdout.count("restored onto mesh") == 2, result.stdout
    for variant in ("mlp, fully_autoregressive, idefics2", "pixel_shuffle, fully_autoregressive, idefics2",
                    "perceiver, cross_attention, idefics2", "pixel_shuffle, fully_autoregressive, idefics3",
                    "pixel_shuffle, fully_autoregressive, idefics3 scanned + remat"):
        assert f"connector {variant}, mesh (2, 2, 2)" in result.stdout, result.stdout
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-4000:]


def test_frozen_tower_gets_no_update(seed):
    model, tx, batch = tiny_setup(seed, batch_size=2, frozen=("vision",))
    before, after, metrics = one_step(model, tx, batch)
    assert np.isfinite(float(metrics["loss"]))
    changed = {tower: False for tower in ("vision", "connector", "text")}
    for path, value in traverse_util.flatten_dict(after).items():
        old = traverse_util.flatten_dict(before)[path]
        if not np.array_equal(value, old):
            changed[tower_of(path)] = True
    assert changed == {"vision": False, "connector": True, "text": True}


def run_train(workdir, *overrides, timeout=600):
    args = [sys.executable, "-m", "idefics_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
            "--workdir", str(workdir), *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


RUN = ["--config.train.steps=14", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
       "--config.data.synthetic_num=60", "--config.data.batch_size=4", "--config.data.seq_len=256"]


def losses(workdir):
    from idefics_jax.train.metrics import read_metrics

    return [(row["step"], row["train/loss"]) for row in read_metrics(str(workdir))]


def test_killed_run_resumes_with_the_same_losses(tmp_path, seed):
    data = tmp_path / "data"  # one synthetic data set for both runs
    common = RUN + [f"--config.data.dir={data}"]
    # this run also writes a profile of steps 2-3: the losses of the runs below, which do not, are its
    full = run_train(tmp_path / "full", *common, "--config.train.profile_first_step=2", "--config.train.profile_steps=2")
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    expected = losses(tmp_path / "full")
    assert [s for s, _ in expected] == list(range(1, 15))
    assert f"Profile of steps 2-3 written to {tmp_path / 'full' / 'profile'}" in err
    # each resolution bucket's program: its memory per device, from XLA (for choosing train.remat)
    assert re.search(r"Step compiled for the batch's images \(4, \d+, \d+, \d+, 3\); per device: [\d.]+ GB of "
                     r"inputs .*, [\d.]+ GB of temporaries .*; remat 'none'", err), err[-3000:]
    assert list((tmp_path / "full" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    # read per op class with the compiled step's text saved beside it
    from idefics_jax.train import profile_summary

    trace = profile_summary.latest_trace(tmp_path / "full" / "profile")
    hlo = (tmp_path / "full" / "profile" / profile_summary.HLO_FILE).read_text()
    summary = profile_summary.summarize(trace, {profile_summary.module_name(hlo): hlo})
    assert all(summary[kind]["seconds"] > 0 for kind in ("matmuls", "attention", "norms", "optimizer")), summary
    assert abs(sum(row["share"] for row in summary.values()) - 1) < 1e-6
    assert profile_summary.main([str(tmp_path / "full" / "profile")]) == 0
    # the session's cache (conftest) holds the compiled step: the resumed run below skips compiling it
    assert f"Compiled programs are cached in {os.environ['JAX_COMPILATION_CACHE_DIR']}" in err
    assert any(name.startswith("jit_step-") for name in os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]))
    # the evaluate command reads the workdir (latest step) and answers as the training run's own eval did
    from idefics_jax.cli import evaluate

    report_path = tmp_path / "report.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "full"), "--data", str(data / "conversations_eval"),
                          "--output", str(report_path)]) == 0
    report, during = (json.loads(f.read_text()) for f in (report_path, tmp_path / "full" / "eval_14.json"))
    assert [r["prediction"] for r in report["results"]] == [r["prediction"] for r in during["results"]]
    assert report["n"] == during["n"] > 0 and report["checkpoint"].endswith("at step 14")

    kill_after = int(np.random.default_rng(seed).integers(4, 12))
    victim = run_train(tmp_path / "killed", *common)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_train(tmp_path / "killed", *common)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert losses(tmp_path / "killed") == expected
    rows = [row["step"] for row in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in row]
    assert rows == list(range(1, 15)), "the steps the resumed run repeated are in metrics.jsonl once"

    # bytes flipped in the last checkpoint (14): found, moved aside, and the run goes on from step 12
    # to the same losses
    flip_bytes(np.random.default_rng(seed), tmp_path / "killed" / "checkpoints" / "14")
    again = run_train(tmp_path / "killed", *common)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "Checkpoint step 14 is corrupt" in err and "Resumed from" in err and "at step 12" in err
    assert (tmp_path / "killed" / "checkpoints_corrupt" / "14").is_dir()
    assert losses(tmp_path / "killed") == expected


@pytest.mark.parametrize("connector,architecture", [("perceiver", "fully_autoregressive"),
                                                    ("mlp", "fully_autoregressive"),
                                                    ("pixel_shuffle", "fully_autoregressive"),
                                                    ("perceiver", "cross_attention")])
def test_step_flops_count_every_weight_matrix(seed, connector, architecture):
    """The FLOPs behind the logged MFU: `matmul_flops` equals the train step's products with a weight
    (the dot_generals without batch axes, attention's have [batch, heads]), read off its jaxpr, for
    a batch with no padding, with each connector and architecture; `step_flops` adds attention's
    visible pairs on top."""
    import flax.linen as nn

    from idefics_jax import Idefics2
    from idefics_jax.sharding import LOGICAL_AXIS_RULES
    from idefics_jax.train.flops import dot_shapes, matmul_flops, step_flops
    from idefics_jax.train.optimizer import make_optimizer
    from idefics_jax.train.step import TrainState, train_step_fn
    from helpers.training import tiny_config

    config = tiny_config(connector, architecture)
    rng = np.random.default_rng([seed, 12])
    rows, seq, size = 2, 80, config.vision.image_size
    tokens = rng.integers(3, 1000, (rows, seq)).astype(np.int32)
    tokens[:, 1:1 + config.image_seq_len] = config.image_token_id  # one image a row, no padding anywhere
    batch = dict(input_ids=tokens, segment_ids=np.ones_like(tokens), positions=np.arange(seq)[None].repeat(rows, 0),
                 targets=np.roll(tokens, -1, axis=1), loss_mask=tokens != config.image_token_id,
                 pixel_values=rng.normal(size=(rows, 1, size, size, 3)).astype(np.float32),
                 pixel_attention_mask=np.ones((rows, 1, size, size), bool))
    model = Idefics2(config)
    tx, _ = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:, :4]))))
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                rng=jax.random.PRNGKey(0)), params["params"])
    with jax.set_mesh(make_mesh()), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        jaxpr = jax.jit(train_step_fn(model, tx)).trace(state, batch).jaxpr.jaxpr
    weights = sum(2 * m * k * n * count for (b, m, k, n), count in dot_shapes(jaxpr).items() if b == 1)
    patches = rows * (size // config.vision.patch_size) ** 2
    assert matmul_flops(config, patches, rows, rows * seq) == weights
    assert step_flops(config, batch) > weights


def test_maxtext_flops_count_whole_rows_and_half_the_causal_square(seed):
    """MaxText's convention (`maxtext_step_flops`) against the visible pairs (`step_flops`): for one
    unpadded segment a row and no window they differ by the diagonal, 6 x layers x width x seq a row;
    packing two segments into a row and padding it make MaxText's count larger by their pairs."""
    from idefics_jax.train.flops import maxtext_step_flops, step_flops
    from helpers.training import tiny_batch, tiny_config

    config = tiny_config()
    config = config.replace(text=config.text.replace(sliding_window=None))
    batch = tiny_batch(config, seed, 2, seq_len=96)
    t = config.text
    width = t.num_attention_heads * t.attention_head_dim
    whole = dict(batch, segment_ids=np.ones_like(batch["segment_ids"]))
    rows, seq = whole["segment_ids"].shape
    assert maxtext_step_flops(config, whole) == step_flops(config, whole) - 6 * t.num_hidden_layers * width * rows * seq
    assert maxtext_step_flops(config, batch) > step_flops(config, batch)


def test_compilation_cache_setting():
    """`use_compilation_cache`: a directory given is used (programs land there), JAX's own setting
    wins, "" leaves the cache off. In fresh processes: the setting is global to one."""
    code = """
import os, sys, jax, jax.numpy as jnp
from idefics_jax.distributed import use_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(use_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).block_until_ready()
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = lambda arg, **extra: subprocess.run([sys.executable, "-c", code, arg], env={**env, **extra},
                                             capture_output=True, text=True, timeout=120)
    with tempfile.TemporaryDirectory() as given, tempfile.TemporaryDirectory() as jax_own:
        result = run(given)
        assert result.stdout.split() == [given] and os.listdir(given), result.stderr[-2000:]
        result = run(given + "/other", JAX_COMPILATION_CACHE_DIR=jax_own)
        assert result.stdout.split() == [jax_own] and os.listdir(jax_own) and not os.path.exists(given + "/other")
        assert run("").stdout.split() == ["None"]


def test_config_typo_and_a_file_for_workdir_are_one_line_errors(tmp_path):
    proc = run_train(tmp_path, "--config.train.stepz=3")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "error: no such config key 'stepz' Did you mean \"steps\"" in err, err
    assert "Traceback" not in err
    (tmp_path / "file").write_text("not a directory")
    proc = run_train(tmp_path / "file")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and f"error: The workdir {tmp_path / 'file'} is a file" in err, err
    assert "Traceback" not in err and (tmp_path / "file").read_text() == "not a directory"


def test_unknown_attention_implementation_or_remat_policy_is_named():
    from idefics_jax.train.config import base_config
    from idefics_jax.train.run import build_run

    config = base_config("tiny")
    config.data.synthetic = True
    config.model.attention_impl = "flsh"
    with pytest.raises(ValueError, match="attention_impl 'flsh' is not one of"):
        build_run(config)
    config.model.attention_impl = "xla"
    config.train.remat = "minmal"
    with pytest.raises(ValueError, match=r"config.train.remat='minmal' is not a rematerialisation policy "
                                         r"\(did you mean 'minimal'\?\)"):
        build_run(config)
    config.train.remat = "minimal"
    assert build_run(config).model.remat == "minimal"


def test_batch_that_does_not_split_into_micro_batches_is_named(tmp_path):
    from idefics_jax.train.config import base_config
    from idefics_jax.train.loop import train

    config = base_config("tiny")
    config.data.synthetic = True
    config.data.batch_size, config.optimizer.accum_steps = 8, 3
    with pytest.raises(ValueError, match=r"batch_size=8 is not a multiple of config.optimizer.accum_steps=3"):
        train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_ops_are_classified_by_opcode_target_and_source_path():
    from idefics_jax.train.profile_summary import classify, op_classes

    attention = "jit(step)/jvp(Idefics2)/model/text_model/layers_0/self_attn/attention/dot_general"
    assert classify("fusion", attention) == "attention"
    assert classify("custom-call", "x", "__gpu$xla.gpu.triton") == "attention"
    assert classify("fusion", "jit(step)/jvp(Idefics2)/model/text_model/layers_0/mlp/up_proj/dot_general") == "matmuls"
    assert classify("custom-call", "jit(step)/lm_head/dot_general", "__cublas$gemm") == "matmuls"
    assert classify("fusion", "jit(step)/model/text_model/layers_0/input_layernorm/mul") == "norms"
    assert classify("fusion", "jit(step)/optimizer/mul") == "optimizer"
    assert classify("fusion", "jit(generate_loop)/while/body/sampling/argmax") == "sampling"
    assert classify("all-reduce-start") == "collectives" and classify("copy-start") == "copies"
    assert classify("fusion", "", "", "wrapped_convert.12") == "copies"
    assert classify("fusion", "jit(step)/model/text_model/embed_tokens/take") == "other"
    text = ('HloModule jit_step\n  %fusion.3 = f32[8,8]{1,0} fusion(f32[8,8] %p), kind=kLoop, calls=%c, '
            'metadata={op_name="jit(step)/optimizer/add" source_file="x.py"}\n'
            '  ROOT dot.1 = f32[8,8]{1,0} dot(f32[8,8] a, f32[8,8] b), metadata={op_name="jit(step)/q_proj/dot_general"}')
    assert op_classes(text) == {"fusion.3": "optimizer", "dot.1": "matmuls"}


def test_profile_settings_are_checked():
    from idefics_jax.train.profiler import StepProfiler

    for first, count in [(-1, 3), (2, 0)]:
        with pytest.raises(ValueError, match=f"profile_first_step={first} / profile_steps={count}"):
            StepProfiler("unused", first, count)
    assert not StepProfiler("unused", 0, 0).enabled


def test_loss_plot(tmp_path):
    from idefics_jax.train.metrics import MetricWriter, plot_loss

    writer = MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"train/loss": 5.0 / step})
    writer.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    out = plot_loss(str(tmp_path))
    assert Path(out).stat().st_size > 1000
    # a last row cut short (a kill mid-write, or a copy taken then) is left out; a bad row elsewhere is named
    from idefics_jax.train.metrics import read_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 6, "train/lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    metrics.write_text('{"step": 1\n' + metrics.read_text())
    with pytest.raises(ValueError, match="metrics.jsonl, line 1: not JSON"):
        read_metrics(tmp_path)


def test_two_processes_give_the_losses_of_one(seed):
    import portpicker

    script = str(Path(__file__).parent / "helpers" / "multiprocess_step.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    single = subprocess.run([sys.executable, script, str(seed)], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = json.loads(single.stdout.strip().splitlines()[-1])
    port = portpicker.pick_unused_port()
    launcher = str(ROOT / "launch" / "gpu_multihost.sh")
    procs = [subprocess.Popen(["bash", launcher, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--", sys.executable, script, str(seed)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    got = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert got["processes"] == 2 and got["devices"] == 2 and expected["processes"] == 1
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)


def test_workdir_must_be_a_path_that_every_host_shares(tmp_path):
    """A URL other than gs:// is refused (it would become a local directory 's3:'); two processes
    given directories that are not the same one both stop, naming the process that cannot see
    process 0's."""
    import portpicker

    from idefics_jax.train.config import base_config
    from idefics_jax.train.loop import train

    with pytest.raises(ValueError, match="only local paths and gs://bucket/... URLs are supported"):
        train(base_config("tiny"), "s3://bucket/run")
    port = portpicker.pick_unused_port()
    launcher = str(ROOT / "launch" / "gpu_multihost.sh")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    procs = [subprocess.Popen(["bash", launcher, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--", sys.executable, "-m", "idefics_jax.train", "--config",
                               str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / f"host{i}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode != 0 and "is not one directory shared by the hosts: process(es) [1]" in err, err[-2000:]
    assert not (tmp_path / "host0" / "checkpoints").exists()  # stopped before anything was written


def test_launcher_rejects_bad_arguments():
    launcher = str(ROOT / "launch" / "gpu_multihost.sh")
    bad = subprocess.run(["bash", launcher, "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                          "--process-id", "2", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "outside 0..1" in bad.stderr
    missing = subprocess.run(["bash", launcher, "--", "true"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
    assert missing.returncode == 2 and "required" in missing.stderr


def test_distributed_initialize_needs_all_three_settings():
    from idefics_jax.distributed import DistributedError, initialize

    with pytest.raises(DistributedError, match="needs all of coordinator, num_processes and process_id"):
        initialize("127.0.0.1:1234", None, 0)


def test_flipped_bytes_anywhere_in_a_checkpoint_are_found(tmp_path, seed, caplog):
    """Twelve draws: bytes flipped at a random place of a random file of the latest step (data,
    orbax's metadata, the data iterator's state, the checksums themselves). Each time the restore
    names the step and the file, moves the step aside and restores the one before, exactly."""
    import shutil

    import flax.linen as nn

    from idefics_jax.checkpoints.train_state import CHECKSUMS, Checkpointer, abstract_with_shardings
    from idefics_jax.train.step import state_shardings

    model, tx, batch = tiny_setup(seed, batch_size=2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed))
    step = make_train_step(model, tx, mesh)
    checkpointer = Checkpointer(tmp_path / "saved" / "ckpt", keep=5)
    saved = {}
    for i in (1, 2):
        state, _ = step(state, global_batch(batch, mesh))
        checkpointer.save(i, state, {"pipeline": {"position": i}})
        saved[i] = jax.tree.map(np.asarray, state.params)
    checkpointer.close()
    assert (tmp_path / "saved" / "ckpt" / "2" / CHECKSUMS).exists()
    init, shardings = state_shardings(model, tx, mesh)
    abstract = abstract_with_shardings(jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0)),
                                       shardings)
    rng = np.random.default_rng(seed)
    flipped = set()
    for draw in range(12):
        work = tmp_path / f"draw{draw}"
        shutil.copytree(tmp_path / "saved", work)
        flipped.add(name := flip_bytes(rng, work / "ckpt" / "2"))
        caplog.clear()
        with caplog.at_level("WARNING"):
            checkpointer = Checkpointer(work / "ckpt")
            restored_step, restored, data = checkpointer.restore(abstract)
        assert restored_step == 1 and data == {"pipeline": {"position": 1}}, name
        assert "Checkpoint step 2 is corrupt" in caplog.text and name.split("/")[0] in caplog.text, caplog.text
        assert checkpointer.all_steps() == [1], "the corrupt step no longer counts"
        checkpointer.close()
        assert (work / "ckpt_corrupt" / "2").is_dir() and not (work / "ckpt" / "2").exists()
        for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved[1])):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert len(flipped) > 3, flipped


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, seed, caplog):
    import flax.linen as nn

    from idefics_jax.checkpoints.train_state import CHECKSUMS, Checkpointer, abstract_with_shardings
    from idefics_jax.train.step import state_shardings

    model, tx, batch = tiny_setup(seed, batch_size=2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed))
    step = make_train_step(model, tx, mesh)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    saved = {}
    for i in (1, 2):
        state, _ = step(state, global_batch(batch, mesh))
        checkpointer.save(i, state, {"pipeline": {"position": i}})
        checkpointer.wait()
        saved[i] = jax.tree.map(np.asarray, state.params)
    checkpointer.close()
    # garble every file of step 2's state, and take its checksums away (as a checkpoint saved
    # before they were written): what orbax cannot read is skipped as well
    for file in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(b"\0garbage" * 4)
    (tmp_path / "ckpt" / "2" / CHECKSUMS).unlink()
    init, shardings = state_shardings(model, tx, mesh)
    abstract = abstract_with_shardings(jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0)),
                                       shardings)
    with caplog.at_level("WARNING"):
        restored_step, restored, data = Checkpointer(tmp_path / "ckpt").restore(abstract)
    assert restored_step == 1 and data == {"pipeline": {"position": 1}}
    assert "has no checksums.json" in caplog.text and "cannot be restored" in caplog.text
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved[1])):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        Checkpointer(tmp_path / "empty").restore(abstract)


def test_learning_rate_multipliers_per_tower(seed):
    from idefics_jax.train.optimizer import make_optimizer

    rng = np.random.default_rng(seed)
    params = {"model": {tower: {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}
                        for tower in ("vision_model", "connector", "text_model")}}
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    settings = dict(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.0, grad_clip=1.0)

    def update(**kwargs):
        tx, _ = make_optimizer(**settings, **kwargs)
        updates, _ = tx.update(grads, tx.init(params), params)
        return {k: np.asarray(v["kernel"]) for k, v in updates["model"].items()}

    plain = update()
    scaled = update(lr_multipliers={"vision": 5.0, "connector": 0.5})
    np.testing.assert_allclose(scaled["vision_model"], 5.0 * plain["vision_model"], rtol=1e-6)
    np.testing.assert_allclose(scaled["connector"], 0.5 * plain["connector"], rtol=1e-6)
    np.testing.assert_allclose(scaled["text_model"], plain["text_model"], rtol=1e-6)
    frozen = update(frozen=("vision",))
    assert not frozen["vision_model"].any()
    with pytest.raises(ValueError, match="lr_multipliers"):
        update(lr_multipliers={"visoin": 2.0})


def test_training_starts_from_a_checkpoint(seed, tmp_path):
    """`config.model.init_from`: the model a run starts training is the checkpoint's, in either
    format, into scanned layers, with fresh DoRA adapters (their magnitudes are the loaded weights'
    norms; made for the random weights they replace, the adapted model would start elsewhere). A
    checkpoint of another model is refused with the fields that differ."""
    from idefics_jax import save_checkpoint, save_hf_checkpoint
    from idefics_jax.models.scan import unstack_layers
    from idefics_jax.models.lora import merge
    from idefics_jax.train.run import build_run, load_initial_params
    from helpers.training import load_config

    config = load_config("tiny")
    config.train.scan_layers, config.train.lora.rank, config.train.lora.dora = True, 4, True
    run = build_run(config)
    mcfg, lora, shardings = run.model_config, run.lora, run.shardings
    state = run.init_state(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)  # the checkpoint: other weights of the same model
    other = {k: v for k, v in state.params.items() if k != "lora"}
    checkpoint = unstack_layers(jax.tree.map(lambda x: np.asarray(x) * rng.uniform(0.5, 2) + rng.normal(), other))
    save_hf_checkpoint(tmp_path / "hf", mcfg, checkpoint, dtype="bfloat16")  # trained in float32 from bfloat16
    save_checkpoint(tmp_path / "ours", mcfg, checkpoint)
    as_stored = {"hf": jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), checkpoint), "ours": checkpoint}

    for fmt in ("hf", "ours"):
        started = load_initial_params(run, state, str(tmp_path / fmt))
        for got, want in zip(jax.tree.leaves(unstack_layers(merge(started.params, lora))),
                             jax.tree.leaves(as_stored[fmt])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
        assert jax.tree.map(lambda x: x.sharding, started.params) == shardings.params
        for key, entry in started.params["lora"].items():  # the fresh run's adapters: A random, B zero
            np.testing.assert_array_equal(entry["a"], state.params["lora"][key]["a"])
            assert not np.array_equal(entry["m"], state.params["lora"][key]["m"])

    other = mcfg.replace(text=mcfg.text.replace(rope_theta=mcfg.text.rope_theta * 2))
    with pytest.raises(ValueError, match=r"different model than config.model describes: text.rope_theta="):
        load_initial_params(dataclasses.replace(run, model_config=other), state, str(tmp_path / "ours"))


def test_training_starts_from_pretrained_towers_under_a_new_connector_and_architecture(seed, tmp_path):
    """`config.model.init_towers=vision,text`: the backbones come from a fully autoregressive
    Perceiver checkpoint, the connector (now an mlp) and the cross-attention blocks start fresh;
    only the loaded towers' configs must match."""
    from idefics_jax import save_checkpoint
    from idefics_jax.train.run import build_run, load_initial_params
    from helpers.training import load_config

    source = build_run(load_config("tiny"))
    rng = np.random.default_rng(seed)
    checkpoint = jax.tree.map(lambda x: np.asarray(x) + rng.normal(), source.init_state(jax.random.PRNGKey(seed)).params)
    save_checkpoint(tmp_path / "ours", source.model_config, checkpoint)
    config = load_config("tiny")
    config.model.architecture, config.model.connector, config.data.image_sizing = "cross_attention", "mlp", "square"
    run = build_run(config)
    state = run.init_state(jax.random.PRNGKey(seed + 1))
    started = load_initial_params(run, state, str(tmp_path / "ours"), ["vision", "text"])
    for tower in ("vision_model", "text_model"):
        for got, want in zip(jax.tree.leaves(started.params["model"][tower]), jax.tree.leaves(checkpoint["model"][tower])):
            np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(started.params["lm_head"]["kernel"]), checkpoint["lm_head"]["kernel"])
    fresh = [k for k in state.params["model"] if k == "connector" or k.startswith("gated_cross_attn_layers")]
    assert len(fresh) == 2
    for key in fresh:
        for got, want in zip(jax.tree.leaves(started.params["model"][key]), jax.tree.leaves(state.params["model"][key])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="different model than config.model describes in towers"):
        load_initial_params(run, state, str(tmp_path / "ours"), ["vision", "text", "connector"])
    with pytest.raises(ValueError, match=r"Unknown tower\(s\) \['vison'\]"):
        load_initial_params(run, state, str(tmp_path / "ours"), ["vison"])


def test_two_processes_stop_together_on_a_preemption_notice(tmp_path, seed):
    """SIGTERM to one host of two (the command line, as a scheduler stops it): JAX's preemption
    service tells the other, both save the same step (saving is collective), say so and exit with
    143. (In CI, the bucket training test preempts one process with a real SIGTERM and resumes.)"""
    import portpicker

    launcher = str(ROOT / "launch" / "gpu_multihost.sh")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    port = portpicker.pick_unused_port()
    common = RUN + [f"--config.data.dir={tmp_path / 'data'}", "--config.train.steps=40", "--config.data.eval_source="]
    procs = [subprocess.Popen(["bash", launcher, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--", sys.executable, "-m", "idefics_jax.train", "--config",
                               str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run"), *common],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and procs[1].poll() is None and \
            not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # through the launcher's exec: the host's python process
    outputs = [p.communicate(timeout=600) for p in procs]
    reached = len(losses(tmp_path / "run"))
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 143, err[-3000:]
    assert f"Stopped at step {reached} on a preemption notice" in outputs[0][0] and 2 <= reached < 40
    assert (tmp_path / "run" / "checkpoints" / str(reached)).is_dir()
