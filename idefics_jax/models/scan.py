"""Scan over layers: one compiled layer body instead of N copies (`scan_layers=True`).

With scanning, a tower's layers are one `nn.scan` whose parameters are stacked along a leading
`layers` axis: `.../layers/self_attn/q_proj/kernel [num_layers, in, out]` instead of
`.../layers_0/...`, `.../layers_1/...`. Compilation time and program size stop growing with depth,
which is what makes 32-layer models compile quickly on TPU pods. The Hugging Face conversion,
generation with a KV cache and the tests use the unstacked layout; `stack_layers` and
`unstack_layers` move between the two, losslessly.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.models.remat import remat_layer

LAYER_KEY = re.compile(r"^layers_(\d+)$")


def scanned(layer_cls, num_layers: int, *, remat: bool | str, broadcast_args: int):
    """`nn.scan` of `layer_cls` (whose `__call__(carry, *args)` returns `(carry, per-layer output)`),
    parameters stacked on a leading `layers` axis, the `broadcast_args` arguments shared by all layers,
    each layer rematerialised as `remat` says (models/remat.py)."""
    body = remat_layer(layer_cls, remat, prevent_cse=False)
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * broadcast_args, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})


SCANNED_TOWERS = (("model", "text_model"), ("model", "vision_model", "encoder"))  # the Perceiver is not


def _at(params: dict, path: tuple[str, ...], fn) -> dict:
    if not path:
        return fn(params)
    if path[0] not in params:
        return params
    return {**params, path[0]: _at(params[path[0]], path[1:], fn)}


def stack_layers(params: dict) -> dict:
    """Unstacked (`layers_0`, `layers_1`, ...) -> stacked (`layers`, leading axis), in the scanned towers."""
    for path in SCANNED_TOWERS:
        params = _at(params, path, _stack_tower)
    return params


def unstack_layers(params: dict) -> dict:
    """Stacked (`layers` with a leading axis) -> `layers_0`, `layers_1`, ..., in the scanned towers."""
    for path in SCANNED_TOWERS:
        params = _at(params, path, _unstack_tower)
    return params


def is_stacked(params: dict) -> bool:
    tower = params.get("model", {}).get("text_model", {})
    return "layers" in tower


def _stack_tower(tower: dict) -> dict:
    numbered = {int(m.group(1)): v for k, v in tower.items() if (m := LAYER_KEY.match(k))}
    if not numbered:
        return tower
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f"Layer numbers {sorted(numbered)} are not 0 .. {len(numbered) - 1}")
    rest = {k: v for k, v in tower.items() if not LAYER_KEY.match(k)}
    return {**rest, "layers": jax.tree.map(_stack, *[numbered[i] for i in range(len(numbered))])}


def _stack(*layers):
    """Host arrays stay on the host (a checkpoint being loaded: its stacked tower would not fit
    one device), device arrays stay on the device."""
    if all(isinstance(x, np.ndarray) for x in layers):
        return np.stack(layers)
    return jnp.stack([jnp.asarray(x) for x in layers])


def _unstack_tower(tower: dict) -> dict:
    if "layers" not in tower:
        return tower
    stacked = tower["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in tower.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(count)}}
