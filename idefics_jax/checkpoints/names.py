"""Our parameter paths <-> Hugging Face tensor names: one short table of rules.

Module names mirror the Hugging Face tree, so a name maps by two rules:
  * list index: our `layers_3` is Hugging Face's `layers.3`;
  * leaf: our Flax leaf name and layout -> Hugging Face's, by the table `LEAF_RULES`.

    ("model", "text_model", "layers_3", "self_attn", "q_proj", "kernel")  [in, out]
    <-> "model.text_model.layers.3.self_attn.q_proj.weight"                 [out, in]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re

import numpy as np

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # the same bytes, copied by numpy's own loops


@functools.lru_cache(maxsize=1)
def _copiers() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="transpose")


def transposed(matrix: np.ndarray, rows: int = 32) -> np.ndarray:
    """`matrix.T`, contiguous: copied a band of `rows` rows at a time (a transposing copy in one go
    walks memory with a stride as long as a row, several times slower), the bands spread over the
    host's cores (numpy copies without the GIL), as plain unsigned integers of the same width."""
    out = np.empty(matrix.shape[::-1], matrix.dtype)
    source, target = matrix, out
    if matrix.dtype.itemsize in _UNSIGNED:  # a view: the same width, any layout
        source, target = matrix.view(_UNSIGNED[matrix.dtype.itemsize]), out.view(_UNSIGNED[matrix.dtype.itemsize])

    def copy(start: int):
        target[:, start:start + rows] = source[start:start + rows].T

    starts = range(0, matrix.shape[0], rows)
    if matrix.nbytes < 2**22:  # small: threads cost more than they save
        for start in starts:
            copy(start)
    else:
        list(_copiers().map(copy, starts))
    return out


@dataclasses.dataclass(frozen=True)
class LeafRule:
    flax_leaf: str
    hf_leaf: str
    ndim: int | None  # rank of the Flax array the rule applies to (None: any)
    to_hf_axes: tuple[int, ...] | None = None  # the Flax axes in Hugging Face's order (None: the same)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """The Flax array in Hugging Face's layout (a contiguous copy when the axes move)."""
        return _moved(array, self.to_hf_axes)

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """The Hugging Face tensor in the Flax layout (a contiguous copy when the axes move)."""
        return _moved(array, None if self.to_hf_axes is None else tuple(np.argsort(self.to_hf_axes)))


def _moved(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    if axes is None:
        return array
    if axes == (1, 0):
        return transposed(array)
    return np.ascontiguousarray(np.transpose(array, axes))


LEAF_RULES = (
    LeafRule("kernel", "weight", 2, (1, 0)),  # nn.Dense kernel [in, out] <-> nn.Linear weight [out, in]
    # nn.Conv kernel [kh, kw, in, out] <-> nn.Conv2d weight [out, in, kh, kw]
    LeafRule("kernel", "weight", 4, (3, 2, 0, 1)),
    LeafRule("embedding", "weight", 2),  # nn.Embed
    LeafRule("scale", "weight", 1),  # LayerNorm / RMSNorm
    LeafRule("bias", "bias", 1),
    LeafRule("latents", "latents", 2),  # Perceiver latents
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
    return tuple(flax_shape) if rule.to_hf_axes is None else tuple(flax_shape[i] for i in rule.to_hf_axes)
