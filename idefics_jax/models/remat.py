"""Rematerialisation: which of a layer's activations the backward pass keeps, and which it computes again.

`remat` (the model's attribute, `config.train.remat`) names a policy, with MaxText's names:

| policy | kept from the forward pass (per layer) | recomputed in the backward pass |
|---|---|---|
| `none` | everything | nothing (fastest, most memory) |
| `full` | the layer's input | the whole layer |
| `minimal` | every weight product's output (q, k, v, o and MLP projections) | norms, RoPE, attention, activations |
| `save_qkv_proj` | the attention's query, key and value projections | the rest |
| `minimal_offloaded` | as `minimal`, kept in host memory (`pinned_host`) until the backward pass | as `minimal` |
| `qkv_proj_offloaded` | as `save_qkv_proj`, in host memory | as `save_qkv_proj` |

`True` and `False` mean `full` and `none`. Layers (vision, Perceiver, decoder) are the unit: the
towers' embeddings, the connector's projection and the LM head are never recomputed. Under every
policy but `none` the attention itself (any implementation) is computed again in the backward pass.
"""

from __future__ import annotations

import difflib

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

# names of the tagged activations (`name_activation`), in every tower's attention
QUERY, KEY, VALUE = "query_proj", "key_proj", "value_proj"
QKV = (QUERY, KEY, VALUE)

POLICIES = ("none", "full", "minimal", "save_qkv_proj", "minimal_offloaded", "qkv_proj_offloaded")
_HOST = dict(offload_src="device", offload_dst="pinned_host")


def remat_policy(remat: bool | str) -> str:
    """The policy's name (`True` -> "full", `False` -> "none"); a name that is not one is a `ValueError`
    naming the closest."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in POLICIES:
        close = difflib.get_close_matches(str(remat), POLICIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"remat={remat!r} is not a rematerialisation policy{hint}: choose one of {POLICIES}")
    return remat


def _checkpoint_policy(name: str):
    """jax's checkpoint policy for a policy name (None: nothing saved)."""
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "minimal": policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": policies.save_only_these_names(*QKV),
        "minimal_offloaded": policies.offload_dot_with_no_batch_dims(**_HOST),
        "qkv_proj_offloaded": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(QKV), **_HOST),
    }[name]


def remat_layer(layer_cls, remat: bool | str, **kwargs):
    """`layer_cls` under `nn.remat` with the named policy (`kwargs` to `nn.remat`), or as it is for "none"."""
    name = remat_policy(remat)
    if name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_checkpoint_policy(name), **kwargs)


def name_activation(x, name: str):
    """Tags `x` for the name-based policies (an identity otherwise)."""
    return checkpoint_name(x, name)
