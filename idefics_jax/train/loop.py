"""The training loop: steps, metrics, checkpoints, evaluation, automatic resume.

    train(config, workdir, evaluation=training_evaluation)

Everything a run needs to continue lives in `WORKDIR/checkpoints` (params, optimizer state,
step, RNG, data-iterator state); starting the same command again resumes from the latest
checkpoint that can be read, and the loss sequence continues exactly as if never stopped. The run
itself (model, optimizer, mesh, shardings) is `train.run`'s, its data `train.data`'s.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
from tqdm.auto import tqdm

from idefics_jax.checkpoints.train_state import Checkpointer
from idefics_jax.checkpoints.workdir import checkpoint_directory, write_run_files
from idefics_jax.data.processor import check_tokenizer
from idefics_jax.distributed import check_shared_directory, use_compilation_cache
from idefics_jax.models.lora import merge
from idefics_jax.models.scan import unstack_layers
from idefics_jax.paths import as_path, is_url
from idefics_jax.train.data import global_batch, make_pipeline, prepare_data
from idefics_jax.train.flops import peak_flops, step_flops
from idefics_jax.train.metrics import MetricWriter
from idefics_jax.train.preemption import PreemptionWatch
from idefics_jax.train.profiler import StepProfiler
from idefics_jax.train.run import Run, build_run, load_initial_params
from idefics_jax.train.step import memory_summary

log = logging.getLogger(__name__)


class Throughput:
    """Samples, tokens, images, FLOPs and time over the steps since the last log line (every host's rows)."""

    def __init__(self, run: Run):
        self.run, self.peak = run, peak_flops(jax.devices()[0].device_kind)
        self.reset()

    def reset(self):
        self.time = self.samples = self.tokens = self.images = self.flops = 0.0

    def add(self, batch: dict, seconds: float):
        hosts = jax.process_count()
        self.time += seconds
        self.samples += float(batch["segment_ids"].max(axis=1).sum()) * hosts  # segments are numbered 1, 2, ...
        self.tokens += float((batch["segment_ids"] > 0).sum()) * hosts
        self.images += float(batch["pixel_attention_mask"].any(axis=(2, 3)).sum()) * hosts
        self.flops += step_flops(self.run.model_config, batch) * hosts

    def scalars(self, log_every: int) -> dict:
        per_device = self.flops / self.time / jax.device_count()
        out = {"perf/step_time_s": self.time / log_every, "perf/tokens_per_s": self.tokens / self.time,
               "perf/images_per_s": self.images / self.time, "perf/tflops_per_s_per_device": per_device / 1e12,
               "perf/samples_per_s": self.samples / self.time, "perf/flops_per_sample": self.flops / max(self.samples, 1)}
        if self.peak:
            out["perf/mfu"] = per_device / self.peak
        return out


def start_state(run: Run, checkpointer: Checkpointer, pipeline) -> tuple[int, object]:
    """(step, state): the latest readable checkpoint's (the pipeline set to where it was), or a fresh
    state (from `config.model.init_from` when set)."""
    config = run.config
    if checkpointer.latest_step() is not None:
        start, state, data_state = run.restore(checkpointer)
        pipeline.set_state(data_state["pipeline"])
        log.info("Resumed from %s at step %d", checkpointer.directory, start)
        return start, state
    state = run.init_state(jax.random.PRNGKey(config.train.seed))
    if config.model.init_from:
        towers = [t.strip() for t in config.model.get("init_towers", "").split(",") if t.strip()]
        state = load_initial_params(run, state, config.model.init_from, towers)
        log.info("Started from %s (%s)", config.model.init_from,
                 f"towers {', '.join(towers)}; the others fresh" if towers else "every parameter")
    return 0, state


def train(config, workdir: str | os.PathLike, evaluation=None) -> dict:
    """Trains (or resumes) in `workdir`, a local directory or gs://bucket/path.

    evaluation: what scores held-out answers when `config.data.eval_source` is set, called as
    `evaluation(config, model_config, tokenizer, data_dir, mesh)` once, then the function it returns
    as `(model parameters) -> report` (`idefics_jax.inference.evaluate.training_evaluation`, which the
    command line passes: training does not generate text itself)."""
    if config.data.eval_source and evaluation is None:
        raise ValueError(f"config.data.eval_source={config.data.eval_source!r} needs an evaluation: pass "
                         f"evaluation=idefics_jax.inference.evaluate.training_evaluation, or set it to ''")
    workdir = as_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"The workdir {workdir} is a file; give a directory (new or a run's)")
    cache = use_compilation_cache(config.train.compilation_cache)
    workdir.mkdir(parents=True, exist_ok=True)
    check_shared_directory(workdir)
    run = build_run(config)
    mcfg, mesh = run.model_config, run.mesh
    profiler = StepProfiler(workdir / "profile", config.train.profile_first_step, config.train.profile_steps,
                            enabled=jax.process_index() == 0)
    data_dir, tokenizer = prepare_data(config, workdir)
    check_tokenizer(tokenizer, mcfg, "of the data (config.data.tokenizer)")
    pipeline = make_pipeline(config, data_dir, tokenizer, mcfg.image_seq_len)
    if jax.process_index() == 0:  # what generate / evaluate need to load the workdir, on any machine
        write_run_files(workdir, config, tokenizer)

    checkpointer = Checkpointer(checkpoint_directory(workdir), keep=config.train.keep_checkpoints,
                                keep_period=config.train.keep_period or None,
                                async_save=config.train.async_checkpoints)
    start, state = start_state(run, checkpointer, pipeline)
    params_count = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("Model: %s parameters (%s trainable); mesh %s", f"{params_count:,}",
             f"{run.count_trainable(state.params):,}", dict(mesh.shape))
    if cache:
        log.info("Compiled programs are cached in %s", cache)

    step_fn = run.train_step()
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    window = Throughput(run)
    history = []
    bar = tqdm(total=config.train.steps, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    step = start
    last_eval = evaluate = None
    preemption = PreemptionWatch()
    compiled_for = set()  # the image shapes (resolution buckets) the step was compiled for
    try:
        while step < config.train.steps:
            started = time.perf_counter()
            batch = next(pipeline)
            profiler.before(step + 1)
            placed = global_batch(batch, mesh)
            if (images := placed["pixel_values"].shape) not in compiled_for:  # a new bucket: a new program
                compiled_for.add(images)
                if memory := memory_summary(step_fn.compile(state, placed)):  # jit's cache keeps it for the call
                    log.info("Step compiled for the batch's images %s; per device: %s; remat %r", images, memory,
                             run.model.remat)
            profiler.save_program(lambda: step_fn.compile(state, placed).as_text())  # while tracing, once
            state, metrics = step_fn(state, placed)
            step += 1
            if traced := profiler.after(step, (state, metrics)):
                log.info("Profile of steps %d-%d written to %s%s", profiler.first, step, traced,
                         " (uploading in the background)" if is_url(traced) else "")
            loss = float(metrics["loss"])  # waits for the step: the time below is the step's
            checkpointer.seal_committed()  # the last checkpoint's checksums, once orbax has committed it
            window.add(batch, time.perf_counter() - started)
            history.append((step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % config.train.log_every == 0 or step == config.train.steps:
                writer.write(step, {"train/loss": loss, "train/grad_norm": float(metrics["grad_norm"]),
                                    "train/learning_rate": float(run.schedule(step - 1)),
                                    **window.scalars(config.train.log_every)})
                window.reset()
            stop = preemption.requested(step)
            if stop or step % config.train.checkpoint_every == 0 or step == config.train.steps:
                checkpointer.save(step, state, {"pipeline": pipeline.get_state()},
                                  force=stop or step == config.train.steps)
            if stop:
                log.warning("Stopped at step %d on a preemption notice, its checkpoint saved in %s: run the same "
                            "command to resume", step, checkpointer.directory)
                break
            eval_now = config.train.eval_every and step % config.train.eval_every == 0
            if config.data.eval_source and (eval_now or step == config.train.steps):
                if evaluate is None:
                    evaluate = evaluation(config, mcfg, tokenizer, data_dir, mesh)
                # generation takes the model's own parameters, unscanned
                report = evaluate(unstack_layers(merge(state.params, run.lora) if run.lora else state.params))
                writer.write(step, {"eval/exact_match": report["exact_match"],
                                    "eval/vqa_accuracy": report["vqa_accuracy"], "eval/anls": report["anls"],
                                    **{f"eval/task/{task}": scores["exact_match"]
                                       for task, scores in report.get("tasks", {}).items()}})
                if jax.process_index() == 0:
                    (workdir / f"eval_{step}.json").write_text(json.dumps(report, indent=1))
                log.info("Step %d: exact match %.3f on %d held-out questions", step, report["exact_match"],
                         report["n"])
                last_eval = report
    finally:
        preemption.close()
        profiler.close()
        bar.close()
        checkpointer.close()  # waits for the last save
        writer.close()
    log.info("Data: %s", pipeline.summary())
    return {"history": history, "state": state, "data_summary": pipeline.summary(), "eval": last_eval,
            "preempted_at": preemption.stopped_at}
