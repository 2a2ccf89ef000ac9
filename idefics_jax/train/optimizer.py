"""AdamW with linear warm-up and cosine decay, global-norm clipping, and frozen towers.

Towers are the top-level parts of the parameter tree: `vision` (the SigLIP tower), `connector`
(modality projection + Perceiver) and `text` (decoder, embeddings and LM head). A frozen tower's
parameters get a zero update and no optimizer state.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import optax
from flax import traverse_util

from idefics_jax.models.lora import ADAPTERS, TOWERS, LoraConfig, check_towers, tower_of


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.1):
    # the first step already learns: warm-up starts at peak / warmup_steps, not at 0
    return optax.warmup_cosine_decay_schedule(
        init_value=peak / max(1, warmup_steps), peak_value=peak, warmup_steps=max(1, warmup_steps),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_ratio)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip: float = 1.0, frozen: Iterable[str] = (), trainable_mask=None,
                   lr_multipliers: Mapping[str, float] | None = None):
    """optax AdamW (+ clipping); `frozen` towers and parameters outside `trainable_mask` stay fixed.

    trainable_mask: optional function `path -> bool` (LoRA trains only its adapters).
    lr_multipliers: per tower (`vision`, `connector`, `text`), a factor on the learning rate (such
    as a lower rate for a pretrained vision tower, or a higher one for towers trained from scratch).
    Clipping is by the global norm of the trainable gradients."""
    frozen = check_towers(frozen, "frozen towers")
    multipliers = {tower: 1.0 for tower in TOWERS}
    multipliers.update(lr_multipliers or {})
    check_towers(multipliers, "lr_multipliers")
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, end_lr_ratio)
    # decay matrices, not norms, biases or the Perceiver latents
    decay_mask = lambda params: traverse_util.path_aware_map(
        lambda path, x: _ndim(x) >= 2 and path[-1] != "latents", params)

    def adamw(multiplier: float):
        rate = schedule if multiplier == 1.0 else (lambda step: schedule(step) * multiplier)
        return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

    def label(params):
        def one(path, _):
            if tower_of(path) in frozen or (trainable_mask is not None and not trainable_mask(path)):
                return "frozen"
            return tower_of(path)
        return traverse_util.path_aware_map(one, params)

    def trainable_only(params):
        return jax.tree.map(lambda name: "frozen" if name == "frozen" else "train", label(params))

    tx = optax.chain(
        optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()}, trainable_only),
        optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
        optax.multi_transform({"frozen": optax.set_to_zero(), **{t: adamw(m) for t, m in multipliers.items()}},
                              label),
    )
    return tx, schedule


def _ndim(x) -> int:
    """Rank of a plain or boxed (logically partitioned) parameter; 0 for optax's MaskedNode."""
    return getattr(getattr(x, "value", x), "ndim", 0)


def count_trainable(params, frozen: Iterable[str] = (), trainable_mask=None) -> int:
    total = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        if tower_of(path) not in frozen and (trainable_mask is None or trainable_mask(path)):
            total += leaf.size
    return total


def lora_trainable(config: LoraConfig, frozen: Iterable[str] = ()):
    """`path -> bool`: adapters train; adapted towers' own weights do not; other towers do unless frozen."""
    frozen = set(frozen)

    def mask(path: tuple[str, ...]) -> bool:
        if path[0] == ADAPTERS:
            return True
        tower = tower_of(path)
        return tower not in config.towers and tower not in frozen
    return mask
