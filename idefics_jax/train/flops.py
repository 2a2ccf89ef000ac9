"""Model FLOPs per training step and the accelerators' peaks, for TFLOP/s and MFU.

FLOPs per step count the matmuls of every tower (6 x parameters x tokens for forward + backward)
plus attention's quadratic part: the vision tower over each image's patches, the Perceiver's
latents over [patches; latents] (the other connectors have none), the decoder's causal (and
windowed) attention over each packed segment, and with the cross-attention architecture its blocks'
attention of every token over the features of its segment's images (an upper bound: tokens before
an image's marker do not see it).

Per training step (forward + backward = 3 x forward; a product of `m x k` by `k x n` is `2mkn`):

    weights    6 x (parameters each token, patch or latent multiplies) x (tokens, patches, latents)
    attention  12 x layers x heads x head_dim x (query, key) pairs

`step_flops` counts the pairs a mask lets through: each packed segment's causal pairs
`n (n + 1) / 2` (fewer under the sliding window) and real tokens only; `maxtext_step_flops` counts
as MaxText does for its published MFU: every position of a row, padding included, and causal
attention as half of the row's square, `S^2 / 2` pairs. For one unpadded segment per row and no
window the two differ by `6 x layers x heads x head_dim x S` per row (the diagonal), 0.05% at
S = 2048; packed rows and padding make MaxText's count the larger.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.extend.core import jaxprs_in_params

from idefics_jax.config import Idefics2Config

# bf16 dense peak FLOP/s per device, by jax `device_kind` substring
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device_kind: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def matmul_flops(config: Idefics2Config, patches: float, images: int, tokens: float) -> float:
    """Training FLOPs (forward + backward: 6 per weight and token) of every weight matrix, for
    `patches` real image patches in `images` images and `tokens` real text tokens. Each matrix counts
    the tokens it multiplies: the vision tower's and the modality projection's the patches, the
    Perceiver's queries, output and MLP its latents, its keys and values [patches; latents]."""
    v, p, t = config.vision, config.perceiver, config.text
    d, latents = t.hidden_size, images * p.resampler_n_latents
    vision = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * patches
    if config.connector == "pixel_shuffle":  # one projection of r^2 patches' features per token
        projection, perceiver = v.hidden_size * d * patches, 0
    else:  # gate, up: vision -> text MLP; down (no Perceiver for "mlp")
        projection = (2 * v.hidden_size + d) * t.intermediate_size * patches
        perceiver = 0 if config.connector == "mlp" else p.resampler_depth * (
            (2 * d * p.resampler_n_heads * p.resampler_head_dim + 3 * d * 4 * d) * latents
            + 2 * d * p.num_key_value_heads * p.resampler_head_dim * (patches + latents))
    text_layer = d * t.attention_head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) \
        + 3 * d * t.intermediate_size
    text = (t.num_hidden_layers * text_layer + d * t.vocab_size) * tokens  # + the LM head
    cross = 0
    if config.architecture == "cross_attention":  # queries, output and MLP on the tokens; keys, values on the features
        cross = cross_attention_blocks(config) * (
            (2 * d * t.num_attention_heads * t.attention_head_dim + 3 * d * t.intermediate_size) * tokens
            + 2 * d * t.num_key_value_heads * t.attention_head_dim * images * config.image_features_len)
    return 6.0 * float(vision + projection + perceiver + text + cross)


def cross_attention_blocks(config: Idefics2Config) -> int:
    """Gated cross-attention blocks: one before every `cross_attention_every`-th decoder layer."""
    return -(-config.text.num_hidden_layers // config.cross_attention_every)


def dot_shapes(jaxpr, times: int = 1, out: dict | None = None) -> dict:
    """{(batch, m, k, n): count} of the `dot_general`s in a jaxpr and its sub-jaxprs (a scan's body
    counted `length` times; XLA's cost analysis counts a loop's body once). 2 * b * m * k * n FLOPs each."""
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            size = lambda shape, dims: int(np.prod([shape[d] for d in dims], dtype=np.int64))
            free = lambda shape, used: int(np.prod([d for i, d in enumerate(shape) if i not in used], dtype=np.int64))
            key = (size(lhs, lb), free(lhs, (*lc, *lb)), size(lhs, lc), free(rhs, (*rc, *rb)))
            out[key] = out.get(key, 0) + times
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jaxprs_in_params(eqn.params):
            dot_shapes(sub, times * repeat, out)
    return out


def _image_counts(config: Idefics2Config, batch: dict[str, Any]):
    """Real patches per image slot `[batch, slots]`."""
    patches = batch["pixel_attention_mask"][..., :: config.vision.patch_size, :: config.vision.patch_size]
    return patches.reshape(*patches.shape[:2], -1).sum(-1)


def _image_attention_flops(config: Idefics2Config, patch_counts) -> float:
    """The vision tower's (bidirectional, per image) and the Perceiver's attention: 2 products of
    2 x queries x keys x width each, x3 for forward + backward."""
    v, p = config.vision, config.perceiver
    flops = 12 * v.num_hidden_layers * v.hidden_size * float((patch_counts**2).sum())
    if config.connector == "perceiver":
        flops += 12 * p.resampler_depth * p.resampler_n_heads * p.resampler_head_dim * p.resampler_n_latents * \
            float((patch_counts[patch_counts > 0] + p.resampler_n_latents).sum())
    return flops


def maxtext_step_flops(config: Idefics2Config, batch: dict[str, Any]) -> float:
    """Training FLOPs of one batch as MaxText counts them for its MFU (`calculate_tflops_training_per_device`):
    every weight matrix times every position of the rows (padding included), and the decoder's causal
    attention as half of the whole row's `seq x seq` (packing and the sliding window not subtracted):
    `6 x layers x heads x head_dim x seq^2` per row. The image towers count as in `step_flops`.
    The numbers to compare with MaxText's published MFU; `step_flops` counts the work the model needs."""
    t = config.text
    patch_counts = _image_counts(config, batch)
    rows, seq = batch["segment_ids"].shape
    flops = matmul_flops(config, float(patch_counts.sum()), int((patch_counts > 0).sum()), float(rows * seq))
    width = t.num_attention_heads * t.attention_head_dim
    return flops + _image_attention_flops(config, patch_counts) + 6 * t.num_hidden_layers * width * rows * seq**2


def step_flops(config: Idefics2Config, batch: dict[str, Any]) -> float:
    """Training FLOPs (forward + backward) of one packed batch."""
    t = config.text
    patch_counts = _image_counts(config, batch)
    n_images = int((patch_counts > 0).sum())
    tokens = float((batch["segment_ids"] > 0).sum())
    flops = matmul_flops(config, float(patch_counts.sum()), n_images, tokens)
    flops += _image_attention_flops(config, patch_counts)
    window = t.sliding_window or 1 << 30
    width = t.num_attention_heads * t.attention_head_dim
    for row in batch["segment_ids"]:
        for segment in np.unique(row[row > 0]):
            n = int((row == segment).sum())
            pairs = sum(min(i + 1, window) for i in range(n)) if n <= 4 * window else n * window
            flops += 12 * t.num_hidden_layers * width * pairs
    if config.architecture == "cross_attention":
        image_segments = batch.get("image_segment_ids")
        for b, row in enumerate(batch["segment_ids"]):
            for segment in np.unique(row[row > 0]):
                images = int((patch_counts[b] > 0).sum()) if image_segments is None else \
                    int(((image_segments[b] == segment) & (patch_counts[b] > 0)).sum())
                pairs = int((row == segment).sum()) * images * config.image_features_len
                flops += 12 * cross_attention_blocks(config) * width * pairs
    return float(flops)
