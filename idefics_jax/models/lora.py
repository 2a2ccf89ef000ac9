"""LoRA and DoRA adapters on chosen projections, as a transformation of the parameter tree.

Adapters live beside the model's parameters, under `params["lora"]`, keyed by the adapted
kernel's path (`model/text_model/layers_0/self_attn/q_proj`):

    LoRA   W' = W + (alpha / rank) * A @ B                          A [in, rank], B [rank, out] = 0
    DoRA   W' = m * (W + (alpha / rank) * A @ B) / ||W + ...||_in    m [out] = ||W||_in at start

`merge(params)` returns ordinary model parameters (the adapters folded in): the train step applies
the model to `merge(params)`, and reading a workdir for inference or export (`idefics_jax.checkpoints`)
merges them. Which parameters train is the optimizer's business (`train.optimizer.lora_trainable`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

ADAPTERS = "lora"
SEP = "/"

TOWERS = ("vision", "connector", "text")


def tower_of(path: tuple[str, ...]) -> str:
    """The tower a parameter path belongs to (a LoRA adapter: its kernel's tower). The cross-attention
    architecture's blocks (`model/gated_cross_attn_layers_N`) carry the images into the decoder, as the
    connector does, and count as the connector: new parameters, trained when the backbones are frozen."""
    if path[0] == "lora":
        return tower_of(tuple(path[1].split("/")))
    if path[0] == "lm_head":
        return "text"
    part = path[1] if path[0] == "model" else path[0]
    if part.startswith("gated_cross_attn_layers"):
        return "connector"
    return {"vision_model": "vision", "connector": "connector", "text_model": "text"}.get(part, "text")


def check_towers(names: Iterable[str], what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in TOWERS]
    if unknown:
        raise ValueError(f"Unknown tower(s) {unknown} in {what}; towers are {TOWERS}")
    return names


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0
    dora: bool = False
    targets: str = r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)$"
    towers: tuple[str, ...] = ("vision", "text")  # towers whose targets get adapters (and stay frozen)

    def __post_init__(self):
        check_towers(self.towers, "lora towers")
        re.compile(self.targets)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _unbox(x):
    return x.value if isinstance(x, nn.LogicallyPartitioned) else x


def _names(x, ndim):
    return x.names if isinstance(x, nn.LogicallyPartitioned) else (None,) * ndim


def target_paths(params, config: LoraConfig) -> list[tuple[str, ...]]:
    pattern = re.compile(config.targets)
    out = []
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[0] == ADAPTERS or path[-1] != "kernel" or _unbox(leaf).ndim < 2:
            continue
        if tower_of(path) in config.towers and pattern.search(path[-2]):
            out.append(path[:-1])
    return out


def add_adapters(params, config: LoraConfig, rng) -> dict:
    """`params` plus fresh adapters (boxed with logical axes when the kernels are)."""
    if not config.enabled:
        return params
    flat = traverse_util.flatten_dict(params)
    adapters = {}
    paths = target_paths(params, config)
    if not paths:
        raise ValueError(f"LoRA targets {config.targets!r} match no projection in towers {config.towers}")
    for i, path in enumerate(paths):
        kernel = flat[path + ("kernel",)]
        w = _unbox(kernel)  # [..., in, out]: a leading `layers` axis when layers are scanned
        names = _names(kernel, w.ndim)
        *lead, fan_in, fan_out = w.shape
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, fan_in, config.rank), w.dtype) / jnp.sqrt(fan_in)
        b = jnp.zeros((*lead, config.rank, fan_out), w.dtype)
        entry = {"a": nn.LogicallyPartitioned(a, (*names[:-1], None)),
                 "b": nn.LogicallyPartitioned(b, (*names[:-2], None, names[-1]))}
        if config.dora:
            entry["m"] = nn.LogicallyPartitioned(magnitude(w), (*names[:-2], names[-1]))
        adapters[SEP.join(path)] = entry
    return {**params, ADAPTERS: adapters}


def magnitude(w):
    """DoRA's starting magnitude `||W||_in` of a kernel `[..., in, out]` -> `[..., out]`."""
    return jnp.linalg.norm(w.astype(jnp.float32), axis=-2).astype(w.dtype)


def start_magnitudes(params, config: LoraConfig) -> dict:
    """Adapter key -> `magnitude` of the kernel it adapts in `params` (model parameters, no
    adapters): where DoRA starts for these weights. Base weights that replace the ones the adapters
    were made with (training from a checkpoint) need them, or the adapted model would not start as
    the checkpoint's."""
    if not config.dora:
        return {}
    flat = traverse_util.flatten_dict(params)
    return {SEP.join(path): magnitude(flat[path + ("kernel",)]) for path in target_paths(params, config)}


def adapted_kernel(w, entry, config: LoraConfig):
    """The merged kernel `[..., in, out]`."""
    delta = (entry["a"].astype(jnp.float32) @ entry["b"].astype(jnp.float32)) * config.scale
    merged = w.astype(jnp.float32) + delta
    if "m" in entry:
        norm = jnp.linalg.norm(merged, axis=-2, keepdims=True)  # per output column
        merged = merged * (entry["m"].astype(jnp.float32)[..., None, :] / norm)
    return merged.astype(w.dtype)


def merge(params, config: LoraConfig) -> dict:
    """Model parameters with the adapters folded in (no `lora` entry)."""
    if ADAPTERS not in params:
        return params
    adapters = params[ADAPTERS]
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != ADAPTERS})
    for key, entry in adapters.items():
        path = tuple(key.split(SEP)) + ("kernel",)
        if path not in flat:
            raise KeyError(f"LoRA adapter for '{key}' has no kernel in the model")
        flat[path] = adapted_kernel(flat[path], entry, config)
    return traverse_util.unflatten_dict(flat)
