"""The training loop: data, model, sharded state, steps, metrics, checkpoints, automatic resume.

    train(config, workdir)

Everything a run needs to continue lives in `WORKDIR/checkpoints` (params, optimizer state,
step, RNG, data-iterator state); starting the same command again resumes from the latest
checkpoint that can be read, and the loss sequence continues exactly as if never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from tqdm.auto import tqdm

from idefics_jax.config import Idefics2Config
from idefics_jax.data.packing import PackConfig
from idefics_jax.data.pipeline import Pipeline, SourceConfig
from idefics_jax.data.tokenizer import Tokenizer
from idefics_jax.distributed import check_shared_directory, use_compilation_cache
from idefics_jax.models.idefics2 import Idefics2
from idefics_jax.models.remat import remat_policy
from idefics_jax.models.scan import is_stacked, stack_layers, unstack_layers
from idefics_jax.ops.attention import IMPLEMENTATIONS
from idefics_jax.paths import as_path, is_url
from idefics_jax.sharding import batch_sharding, make_mesh, put_everywhere
from idefics_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from idefics_jax.train.config import model_config
from idefics_jax.train.metrics import MetricWriter, StepProfiler, peak_flops, step_flops
from idefics_jax.train.preemption import PreemptionWatch
from idefics_jax.train.lora import ADAPTERS, LoraConfig, merge, start_magnitudes
from idefics_jax.train.lora import trainable as lora_trainable
from idefics_jax.train.optimizer import count_trainable, make_optimizer
from idefics_jax.train.step import (MODEL_KEYS, check_batch_size, init_state, make_train_step, memory_summary,
                                    state_shardings)

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str, key: str):
    if name not in _DTYPES:
        raise ValueError(f"config.model.{key}={name!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def synthetic_data_dir(config, workdir: epath.Path) -> Path:
    """Where generated synthetic data lives: WORKDIR/data, or for a gs:// workdir a local directory
    named by what was generated (the pipeline reads a disk; every host makes the same copy)."""
    if not is_url(workdir):
        return Path(workdir) / "data"
    d = config.data
    return Path(tempfile.gettempdir()) / "idefics_jax_data" / f"synthetic-{d.synthetic_num}-{d.seed}-{int(d.synthetic_easy)}"


def prepare_data(config, workdir: epath.Path) -> tuple[epath.Path, Tokenizer]:
    """(the data directory, the tokenizer): `config.data.dir` (a local path or gs://bucket/...), or
    synthetic data, generated on first use."""
    data_dir = as_path(config.data.dir, "config.data.dir") if config.data.dir else \
        epath.Path(synthetic_data_dir(config, workdir))
    if config.data.synthetic and not (data_dir / "tokenizer.model").exists():
        from idefics_jax.data.synthetic import generate

        if is_url(data_dir):
            raise ValueError(f"config.data.dir={config.data.dir} holds no tokenizer.model, and synthetic data is "
                             f"generated on local disk: name a local config.data.dir, or leave it empty")
        # every host writes its own copy (the same for a seed), then renames it into place
        log.info("Generating synthetic data in %s", data_dir)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = data_dir.with_name(f"{data_dir.name}.tmp-{jax.process_index()}-{os.getpid()}")
        generate(tmp, num=config.data.synthetic_num, seed=config.data.seed, formats=("jsonl",),
                 easy=config.data.synthetic_easy)
        try:
            os.replace(tmp, data_dir)
        except OSError:  # another host (shared disk) was first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_path = as_path(config.data.tokenizer, "config.data.tokenizer") if config.data.tokenizer else \
        data_dir / "tokenizer.model"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"Tokenizer {tokenizer_path} not found (config.data.tokenizer)")
    return data_dir, Tokenizer(tokenizer_path)


def make_pipeline(config, data_dir: epath.Path, tokenizer: Tokenizer, image_seq_len: int) -> Pipeline:
    if not config.data.sources:
        raise ValueError("config.data.sources is empty: name at least one source")
    known = {f.name for f in dataclasses.fields(SourceConfig)}
    sources = []
    for i, source in enumerate(config.data.sources):
        source = dict(source)
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"config.data.sources[{i}] has unknown key(s) {unknown}; known: {sorted(known)}")
        source["path"] = str(data_dir / source["path"])
        sources.append(SourceConfig(**source))
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                         f"{jax.process_count()} hosts")
    pack = PackConfig(seq_len=config.data.seq_len, image_slots=config.data.image_slots,
                      buckets=tuple(tuple(b) for b in config.data.buckets), pad_id=tokenizer.pad_id)
    return Pipeline(sources, tokenizer, pack, config.data.batch_size // jax.process_count(),
                    image_seq_len=image_seq_len, seed=config.data.seed, num_workers=config.data.num_workers,
                    read_threads=config.data.read_threads, read_buffer=config.data.read_buffer)


def global_batch(batch: dict, mesh) -> dict:
    """This host's rows -> global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, batch[k].ndim), batch[k])
            for k in MODEL_KEYS}


def lora_config(config) -> LoraConfig | None:
    section = config.train.lora
    lora = LoraConfig(rank=section.rank, alpha=section.alpha, dora=section.dora, targets=section.targets,
                      towers=tuple(section.towers))
    return lora if lora.enabled else None


def build(config, mesh=None):
    """(model config, model, optimizer, schedule, mesh, lora) from a training config (the mesh: as
    `config.mesh` describes, unless one is given)."""
    mcfg = model_config(config.model)
    if config.data.tokenizer == "" and not config.data.synthetic and not config.data.dir:
        raise ValueError("config.data: set tokenizer/dir, or synthetic=True")
    if config.model.attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention_impl '{config.model.attention_impl}' is not one of {IMPLEMENTATIONS}")
    try:
        remat = remat_policy(config.train.remat)
    except ValueError as e:
        raise ValueError(f"config.train.{e}") from None
    model = Idefics2(mcfg, attention_impl=config.model.attention_impl,
                     dtype=_dtype(config.model.dtype, "dtype"), param_dtype=_dtype(config.model.param_dtype, "param_dtype"),
                     remat=remat, neftune_alpha=config.train.neftune_alpha,
                     scan_layers=config.train.get("scan_layers", False))
    o = config.optimizer
    lora = lora_config(config)
    frozen = tuple(config.train.freeze)
    tx, schedule = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                                  total_steps=config.train.steps, end_lr_ratio=o.end_lr_ratio,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip,
                                  frozen=() if lora else frozen, lr_multipliers=dict(o.get("lr_multipliers", {})),
                                  trainable_mask=lora_trainable(lora, frozen) if lora else None)
    if mesh is None:
        m = config.mesh
        # .get: configs saved in workdirs before these keys existed still load
        dcn = tuple(m.get(f"dcn_{axis}", 1) for axis in ("data", "fsdp", "tensor"))
        mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=dcn)
    return mcfg, model, tx, schedule, mesh, lora


def load_initial_params(state, path: str, mcfg, shardings, lora: LoraConfig | None = None):
    """Starts from a Hugging Face directory or an idefics_jax checkpoint (`config.model.init_from`,
    a local path or gs://bucket/...). The checkpoint is read on the host and each parameter placed
    in its shards; LoRA/DoRA adapters stay fresh, DoRA's magnitudes taken from the loaded weights
    (so that the adapted model starts as the checkpoint's)."""
    from idefics_jax.convert import load_checkpoint, load_hf_checkpoint

    path = as_path(path, "config.model.init_from")
    ours = (path / "params").exists()
    config, params = (load_checkpoint if ours else load_hf_checkpoint)(path, on_device=False)
    if config != mcfg:
        raise ValueError(f"config.model.init_from={path} holds a different model than config.model describes: "
                         + "; ".join(config_differences(config, mcfg)))
    if is_stacked(state.params):  # scan_layers: the model keeps each tower's layers stacked
        params = stack_layers(params)
    model_keys = [k for k in state.params if k != ADAPTERS]
    flat = traverse_util.flatten_dict(params)
    del params  # each host array goes as soon as it is placed
    old = traverse_util.flatten_dict({k: state.params[k] for k in model_keys})
    where = traverse_util.flatten_dict({k: shardings.params[k] for k in model_keys})
    loaded = traverse_util.unflatten_dict(
        {key: put_everywhere(np.asarray(flat.pop(key)).astype(old[key].dtype), where[key]) for key in list(flat)})
    params = {**state.params, **loaded}
    if lora and lora.dora:  # from the placed kernels: sharded, in the dtype they train in
        magnitudes = start_magnitudes(loaded, lora)
        params[ADAPTERS] = {key: {**entry, "m": put_everywhere(magnitudes[key], shardings.params[ADAPTERS][key]["m"])}
                            for key, entry in state.params[ADAPTERS].items()}
    return state.replace(params=params)


def config_differences(ours: Idefics2Config, wanted: Idefics2Config) -> list[str]:
    """`section.field=a (config.model: b)` for each field that differs."""
    a, b = (traverse_util.flatten_dict(c.to_dict(), sep=".") for c in (ours, wanted))
    return [f"{key}={a.get(key)!r} (config.model: {b.get(key)!r})" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def evaluate(config, mcfg, params, lora, data_dir: epath.Path, tokenizer: Tokenizer, mesh,
             assistant=None) -> tuple[dict, object]:
    """Exact match (and VQA accuracy) of cached greedy answers on `config.data.eval_source`, generated
    on the training mesh (every process takes part; each gets the whole report).

    Returns (report, assistant): pass the assistant back next time to reuse its compiled programs."""
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.inference.evaluate import evaluate_records, load_records
    from idefics_jax.inference.loading import LoadedModel, training_image_processor

    params = unstack_layers(merge(params, lora) if lora else params)  # generation uses the unscanned model
    if assistant is None:
        assistant = Assistant(LoadedModel(mcfg, params, tokenizer, training_image_processor(config), "training"),
                              dtype=_dtype(config.model.dtype, "dtype"), mesh=mesh)
    else:
        assistant.generator.use_params(params)
    records, base_dir = load_records(data_dir / config.data.eval_source, config.train.eval_samples)
    report = evaluate_records(assistant, records, base_dir, max_new_tokens=config.train.max_new_tokens)
    return report, assistant


def train(config, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) in `workdir`, a local directory or gs://bucket/path."""
    workdir = as_path(workdir)
    cache = use_compilation_cache(config.train.compilation_cache)
    workdir.mkdir(parents=True, exist_ok=True)
    check_shared_directory(workdir)
    mcfg, model, tx, schedule, mesh, lora = build(config)
    check_batch_size(config.data.batch_size, config.optimizer.accum_steps, mesh)
    profiler = StepProfiler(workdir / "profile", config.train.profile_first_step, config.train.profile_steps,
                            enabled=jax.process_index() == 0)
    data_dir, tokenizer = prepare_data(config, workdir)
    if tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{mcfg.text.vocab_size} (config.model.text.vocab_size)")
    pipeline = make_pipeline(config, data_dir, tokenizer, mcfg.image_seq_len)
    if jax.process_index() == 0:  # what generate / evaluate need to load the workdir, on any machine
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "tokenizer.model").write_bytes(tokenizer.model_proto)

    init, shardings = state_shardings(model, tx, mesh, lora=lora)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                keep_period=config.train.keep_period or None,
                                async_save=config.train.async_checkpoints)
    rng = jax.random.PRNGKey(config.train.seed)
    if checkpointer.latest_step() is not None:
        abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), rng)
        start, state, data_state = checkpointer.restore(abstract_with_shardings(abstract, shardings))
        pipeline.set_state(data_state["pipeline"])
        log.info("Resumed from %s at step %d", checkpointer.directory, start)
    else:
        state = init_state(model, tx, mesh, rng, lora=lora)
        if config.model.init_from:
            state = load_initial_params(state, config.model.init_from, mcfg, shardings, lora)
        start = 0
    params_count = sum(x.size for x in jax.tree.leaves(state.params))
    trainable = count_trainable(state.params, () if lora else tuple(config.train.freeze),
                                lora_trainable(lora, tuple(config.train.freeze)) if lora else None)
    log.info("Model: %s parameters (%s trainable); mesh %s", f"{params_count:,}", f"{trainable:,}", dict(mesh.shape))
    if cache:
        log.info("Compiled programs are cached in %s", cache)

    step_fn = make_train_step(model, tx, mesh, accum_steps=config.optimizer.accum_steps, lora=lora)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    peak = peak_flops(jax.devices()[0].device_kind)
    history = []
    bar = tqdm(total=config.train.steps, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    window = {"time": 0.0, "tokens": 0.0, "images": 0.0, "flops": 0.0}
    step = start
    last_eval = assistant = None
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
                             model.remat)
            state, metrics = step_fn(state, placed)
            step += 1
            if traced := profiler.after(step, (state, metrics)):
                log.info("Profile of steps %d-%d written to %s%s", profiler.first, step, traced,
                         " (uploading in the background)" if is_url(traced) else "")
            loss = float(metrics["loss"])  # waits for the step: the time below is the step's
            elapsed = time.perf_counter() - started
            history.append((step, loss))
            window["time"] += elapsed
            window["tokens"] += float((batch["segment_ids"] > 0).sum()) * jax.process_count()
            window["images"] += float(batch["pixel_attention_mask"].any(axis=(2, 3)).sum()) * jax.process_count()
            window["flops"] += step_flops(mcfg, batch) * jax.process_count()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % config.train.log_every == 0 or step == config.train.steps:
                scalars = {"train/loss": loss, "train/grad_norm": float(metrics["grad_norm"]),
                           "train/learning_rate": float(schedule(step - 1)),
                           "perf/step_time_s": window["time"] / config.train.log_every,
                           "perf/tokens_per_s": window["tokens"] / window["time"],
                           "perf/images_per_s": window["images"] / window["time"],
                           "perf/tflops_per_s_per_device": window["flops"] / window["time"] / jax.device_count() / 1e12}
                if peak:
                    scalars["perf/mfu"] = window["flops"] / window["time"] / jax.device_count() / peak
                writer.write(step, scalars)
                window = dict.fromkeys(window, 0.0)
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
                report, assistant = evaluate(config, mcfg, state.params, lora, data_dir, tokenizer, mesh, assistant)
                writer.write(step, {"eval/exact_match": report["exact_match"],
                                    "eval/vqa_accuracy": report["vqa_accuracy"], "eval/anls": report["anls"]})
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


def restore_latest(config, workdir: str | os.PathLike):
    """(model config, merged model params, step) of WORKDIR's (local or gs://) latest readable checkpoint,
    split over all devices (fsdp): any host or pod can read any run's workdir, whatever mesh and
    slices the run trained on."""
    mcfg, model, tx, _, mesh, lora = build(config, mesh=make_mesh(1, -1, 1))
    init, shardings = state_shardings(model, tx, mesh, lora=lora)
    checkpointer = Checkpointer(as_path(workdir) / "checkpoints", async_save=False)
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0))
    step, state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings))
    checkpointer.close()
    params = merge(state.params, lora) if lora else state.params
    return mcfg, unstack_layers(params), step


def export_hf(config, workdir: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Writes WORKDIR's latest checkpoint (LoRA/DoRA merged) as a Hugging Face directory (local or
    gs://), with the run's tokenizer and its image sizes (`preprocessor_config.json`), which
    `generate`, `evaluate` and `config.model.init_from` read. Every process of a multi-host run
    calls it (each tensor is gathered from the hosts holding it; process 0 writes). Returns the step."""
    from idefics_jax.convert import copy_processor_files, save_hf_checkpoint
    from idefics_jax.inference.loading import save_image_processor, training_image_processor

    mcfg, params, step = restore_latest(config, workdir)
    out = as_path(out_dir, "--export_hf")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        copy_processor_files(workdir, out)  # the tokenizer the run saved
        save_image_processor(out, training_image_processor(config))
    save_hf_checkpoint(out, mcfg, params, progress=True)  # returns on every process once complete
    return step
