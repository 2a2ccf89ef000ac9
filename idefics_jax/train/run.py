"""A training run built once from its config: model, optimizer, mesh, adapters, and the train
state's initialiser, shapes and shardings, which init, restore and the step all take from here.

    run = build_run(config)                      # config.mesh's mesh, unless one is given
    state = run.init_state(rng)                  # or: run.restore(checkpointer)
    step = run.train_step()
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from idefics_jax.checkpoints import load_checkpoint, load_hf_checkpoint
from idefics_jax.checkpoints.train_state import Checkpointer, abstract_with_shardings
from idefics_jax.checkpoints.workdir import CHECKPOINTS, frozen_of, lora_of, restore_workdir
from idefics_jax.config import TILED_MODEL_TYPES, Idefics2Config, model_config
from idefics_jax.models.idefics2 import Idefics2
from idefics_jax.models.lora import ADAPTERS, LoraConfig, check_towers, start_magnitudes, tower_of
from idefics_jax.models.remat import remat_policy
from idefics_jax.models.scan import is_stacked, stack_layers
from idefics_jax.ops.attention import IMPLEMENTATIONS
from idefics_jax.paths import as_path
from idefics_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, put_everywhere
from idefics_jax.train.optimizer import count_trainable, lora_trainable, make_optimizer
from idefics_jax.train.step import TrainState, check_batch_size, make_train_step, state_shardings

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str, key: str):
    """`config.model.<key>`'s dtype; an error naming the key for any other name."""
    if name not in _DTYPES:
        raise ValueError(f"config.model.{key}={name!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass
class Run:
    """Everything a training config builds, each part computed once (the state's layout on first use:
    tracing an 8B model's initialiser takes seconds)."""

    config: ml_collections.ConfigDict
    model_config: Idefics2Config
    model: Idefics2
    tx: optax.GradientTransformation
    schedule: Callable[[int], Any]
    mesh: Mesh
    lora: LoraConfig | None

    @functools.cached_property
    def _layout(self):
        init, shardings = state_shardings(self.model, self.tx, self.mesh, lora=self.lora)
        abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0))
        return init, shardings, abstract_with_shardings(abstract, shardings)

    @property
    def init(self) -> Callable[[jax.Array], TrainState]:
        """rng -> a fresh state, logically annotated (boxed)."""
        return self._layout[0]

    @property
    def shardings(self) -> TrainState:
        """Where each array of the state lives on `mesh`."""
        return self._layout[1]

    @property
    def abstract(self) -> TrainState:
        """The state's shapes and dtypes with those shardings: what a restore reads into."""
        return self._layout[2]

    def init_state(self, rng) -> TrainState:
        """A fresh state, each array created directly in its shards."""
        init, shardings = self.init, self.shardings  # worked out outside the mesh context below
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)

    def restore(self, checkpointer: Checkpointer, step: int | None = None) -> tuple[int, TrainState, dict]:
        """(step, state, data-iterator state) of the checkpoint, read straight into this run's shards."""
        return checkpointer.restore(self.abstract, step)

    def train_step(self):
        """The jitted step `(state, placed batch) -> (state, metrics)` (`train.step.make_train_step`)."""
        return make_train_step(self.model, self.tx, self.mesh, accum_steps=self.config.optimizer.accum_steps,
                               lora=self.lora, shardings=self.shardings)

    @property
    def frozen(self) -> tuple[str, ...]:
        return frozen_of(self.config)

    def count_trainable(self, params) -> int:
        if self.lora:
            return count_trainable(params, (), lora_trainable(self.lora, self.frozen))
        return count_trainable(params, self.frozen)


def _mesh_of(config) -> Mesh:
    m = config.mesh
    # .get: configs saved in workdirs before these keys existed still load
    dcn = tuple(m.get(f"dcn_{axis}", 1) for axis in ("data", "fsdp", "tensor"))
    return make_mesh(m.data, m.fsdp, m.tensor, dcn=dcn)


def check_image_sizing(config, mcfg: Idefics2Config):
    """The mlp and pixel_shuffle connectors count their tokens from a square image of
    `vision.image_size`: every source must be resized so (Idefics3's and SmolVLM's processing cuts
    every image into such squares itself, and the batch's image buckets are those squares)."""
    side = mcfg.vision.image_size
    if mcfg.model_type in TILED_MODEL_TYPES:
        buckets = [tuple(b) for b in config.data.buckets]
        if buckets != [(side, side)]:
            raise ValueError(f"config.data.buckets={buckets}: a {mcfg.model_type} model's images are tiles of "
                             f"model.vision.image_size={side} px; set the buckets to [({side}, {side})]")
        return
    if mcfg.connector == "perceiver":
        return
    for name, source in config.data.sources.items():
        sizing = source.get("image_sizing", config.data.image_sizing)
        if sizing != "square" or source.get("longest_edge", 980) != side:
            raise ValueError(f"config.model.connector={mcfg.connector} takes square images of model.vision.image_size="
                             f"{side} px; source '{name}' has image_sizing={sizing}, longest_edge="
                             f"{source.get('longest_edge', 980)} (set --config.data.image_sizing=square and its "
                             f"longest_edge to {side})")


def build_run(config, mesh: Mesh | None = None) -> Run:
    """The run a training config describes (on `config.mesh`'s mesh, unless one is given); a bad
    key or value is an error naming it."""
    mcfg = model_config(config.model)
    check_image_sizing(config, mcfg)
    if config.data.tokenizer == "" and not config.data.synthetic and not config.data.dir:
        raise ValueError("config.data: set tokenizer/dir, or synthetic=True")
    if config.model.attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention_impl '{config.model.attention_impl}' is not one of {IMPLEMENTATIONS}")
    try:
        remat = remat_policy(config.train.remat)
    except ValueError as e:
        raise ValueError(f"config.train.{e}") from None
    model = Idefics2(mcfg, attention_impl=config.model.attention_impl,
                     dtype=dtype_of(config.model.dtype, "dtype"),
                     param_dtype=dtype_of(config.model.param_dtype, "param_dtype"),
                     remat=remat, neftune_alpha=config.train.neftune_alpha,
                     scan_layers=config.train.get("scan_layers", False))
    o = config.optimizer
    lora = lora_of(config)
    frozen = frozen_of(config)
    tx, schedule = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                                  total_steps=config.train.steps, end_lr_ratio=o.end_lr_ratio,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip,
                                  frozen=() if lora else frozen, lr_multipliers=dict(o.get("lr_multipliers", {})),
                                  trainable_mask=lora_trainable(lora, frozen) if lora else None)
    mesh = _mesh_of(config) if mesh is None else mesh
    check_batch_size(config.data.batch_size, config.optimizer.accum_steps, mesh)
    return Run(config, mcfg, model, tx, schedule, mesh, lora)


# the config fields each tower's parameters depend on (`config.model.init_towers`); the connector's
# are the rest: its kind, the Perceiver's, and the cross-attention blocks'
TOWER_FIELDS = {"vision": ("vision",), "text": ("text", "tie_word_embeddings")}


def load_initial_params(run: Run, state: TrainState, path: str, towers=()) -> TrainState:
    """Starts from a Hugging Face directory, an idefics_jax checkpoint or a training workdir (its
    latest step) (`config.model.init_from`, a local path or gs://bucket/...). The checkpoint is read
    on the host and each parameter placed in its shards; LoRA/DoRA adapters stay fresh, DoRA's
    magnitudes taken from the loaded weights (so that the adapted model starts as the checkpoint's).
    towers (`config.model.init_towers`): load only these ("vision", "connector", "text"), the others
    start fresh, and only their configs must match: pre-trained backbones under a new connector or
    architecture, as the paper's ablations start."""
    mcfg, shardings, lora = run.model_config, run.shardings, run.lora
    towers = check_towers(towers, "config.model.init_towers")
    path = as_path(path, "config.model.init_from")
    if (path / "config.json").exists() and (path / CHECKPOINTS).exists():  # a training workdir
        config, params, _ = restore_workdir(path)
    else:
        config, params = (load_checkpoint if (path / "params").exists() else load_hf_checkpoint)(path, on_device=False)
    differences = config_differences(config, mcfg)
    if towers and "connector" not in towers:  # the fields of the towers loaded
        fields = tuple(f for t in towers for f in TOWER_FIELDS[t])
        differences = [d for d in differences if d.split("=")[0].split(".")[0] in fields]
    if differences:
        raise ValueError(f"config.model.init_from={path} holds a different model than config.model describes"
                         + (f" in towers {list(towers)}" if towers else "") + ": " + "; ".join(differences))
    if is_stacked(state.params):  # scan_layers: the model keeps each tower's layers stacked
        params = stack_layers(params)
    model_keys = [k for k in state.params if k != ADAPTERS]
    flat = traverse_util.flatten_dict(params)
    del params  # each host array goes as soon as it is placed
    if towers:
        flat = {key: value for key, value in flat.items() if tower_of(key) in towers}
    old = traverse_util.flatten_dict({k: state.params[k] for k in model_keys})
    where = traverse_util.flatten_dict({k: shardings.params[k] for k in model_keys})
    missing = sorted("/".join(key) for key in flat if key not in old)
    if missing:
        raise ValueError(f"config.model.init_from={path} holds parameters this model does not have: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    loaded = {key: put_everywhere(np.asarray(flat.pop(key)).astype(old[key].dtype), where[key]) for key in list(flat)}
    # the parameters not loaded (other towers under init_towers) keep their fresh values
    params = {**state.params, **traverse_util.unflatten_dict({**old, **loaded})}
    loaded = traverse_util.unflatten_dict(loaded)
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
