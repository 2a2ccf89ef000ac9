"""Our parameter paths <-> Hugging Face tensor names: one short table of rules.

Module names mirror the Hugging Face tree, so a name maps by two rules:
  * list index: our `layers_3` is Hugging Face's `layers.3`;
  * leaf: our Flax leaf name and layout -> Hugging Face's, by the table `LEAF_RULES`.

    ("model", "text_model", "layers_3", "self_attn", "q_proj", "kernel")  [in, out]
    <-> "model.text_model.layers.3.self_attn.q_proj.weight"                 [out, in]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LeafRule:
    flax_leaf: str
    hf_leaf: str
    ndim: int | None  # rank of the Flax array the rule applies to (None: any)
    to_hf: Callable[[np.ndarray], np.ndarray]
    to_flax: Callable[[np.ndarray], np.ndarray]


_same = lambda x: x
LEAF_RULES = (
    # nn.Dense kernel [in, out] <-> nn.Linear weight [out, in]
    LeafRule("kernel", "weight", 2, lambda k: k.T, lambda w: w.T),
    # nn.Conv kernel [kh, kw, in, out] <-> nn.Conv2d weight [out, in, kh, kw]
    LeafRule("kernel", "weight", 4, lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0)),
    LeafRule("embedding", "weight", 2, _same, _same),  # nn.Embed
    LeafRule("scale", "weight", 1, _same, _same),  # LayerNorm / RMSNorm
    LeafRule("bias", "bias", 1, _same, _same),
    LeafRule("latents", "latents", 2, _same, _same),  # Perceiver latents
)

_LAYER = re.compile(r"^(\w+)_(\d+)$")


def leaf_rule(flax_leaf: str, ndim: int) -> LeafRule:
    for rule in LEAF_RULES:
        if rule.flax_leaf == flax_leaf and rule.ndim in (None, ndim):
            return rule
    raise KeyError(f"No conversion rule for a parameter '{flax_leaf}' of rank {ndim}")


def hf_name(path: tuple[str, ...], ndim: int) -> str:
    """Our parameter path -> the Hugging Face tensor name."""
    parts = []
    for part in path[:-1]:
        match = _LAYER.match(part)
        parts.extend([match.group(1), match.group(2)] if match else [part])
    parts.append(leaf_rule(path[-1], ndim).hf_leaf)
    return ".".join(parts)


def hf_shape(flax_shape: tuple[int, ...], rule: LeafRule) -> tuple[int, ...]:
    """The Hugging Face shape of a Flax array of `flax_shape` under `rule`."""
    return tuple(rule.to_hf(np.broadcast_to(np.int8(0), flax_shape)).shape)  # a view: no memory
