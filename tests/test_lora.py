"""LoRA / DoRA: only adapters train, merging is exact, merged weights export to Hugging Face."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from conftest import rel_err
from idefics_jax import Idefics2, save_hf_checkpoint
from idefics_jax.sharding import make_mesh
from idefics_jax.models.lora import LoraConfig, adapted_kernel, merge
from idefics_jax.train.optimizer import lora_trainable as trainable
from idefics_jax.train.data import global_batch
from idefics_jax.train.optimizer import make_optimizer
from idefics_jax.train.step import init_state, make_train_step
from helpers.training import tiny_batch, tiny_config


def train_steps(lora: LoraConfig, seed: int, steps: int = 3, model_type: str = "idefics2"):
    config = tiny_config("perceiver" if model_type == "idefics2" else "pixel_shuffle", model_type=model_type)
    model = Idefics2(config)
    tx, _ = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10, trainable_mask=trainable(lora))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = init_state(model, tx, mesh, jax.random.PRNGKey(seed), lora=lora)
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(model, tx, mesh, lora=lora)
    for i in range(steps):
        state, _ = step(state, global_batch(tiny_batch(config, seed + i, 2), mesh))
    return config, model, before, jax.tree.map(np.asarray, state.params)


def only_adapters_and_unadapted_towers_changed(before, after, dora: bool):
    flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    adapters = [p for p in flat_after if p[0] == "lora"]
    assert adapters and any(p[-1] == "m" for p in adapters) == dora
    for path, value in flat_after.items():
        changed = not np.array_equal(value, flat_before[path])
        if path[0] == "lora":
            if path[-1] == "b":
                assert changed, path  # B starts at zero and must learn
        elif path[1] == "connector":
            assert changed, path  # not adapted, not frozen: trained fully
        else:
            assert not changed, f"{path} is an adapted tower's weight and must stay frozen"


def test_lora_trains_only_adapters_and_unadapted_towers(seed):
    lora = LoraConfig(rank=4, dora=False, towers=("vision", "text"))
    _, _, before, after = train_steps(lora, seed)
    only_adapters_and_unadapted_towers_changed(before, after, dora=False)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_kernel_equals_base_plus_adapter(dora, seed):
    lora = LoraConfig(rank=4, alpha=8.0, dora=dora)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    entry = {"a": rng.standard_normal((32, 4)).astype(np.float32), "b": rng.standard_normal((4, 24)).astype(np.float32)}
    if dora:
        entry["m"] = rng.uniform(0.5, 2, 24).astype(np.float32)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    unmerged = x @ w + lora.scale * (x @ entry["a"]) @ entry["b"]  # the adapter path, beside the base
    if dora:
        unmerged = unmerged * entry["m"] / np.linalg.norm(w + lora.scale * entry["a"] @ entry["b"], axis=0)
    np.testing.assert_allclose(x @ np.asarray(adapted_kernel(w, entry, lora)), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["idefics2", "smolvlm"])
def test_dora_trains_only_adapters_and_its_merged_checkpoint_exports_to_transformers(model_type, seed, tmp_path):
    import transformers

    lora = LoraConfig(rank=4, dora=True, towers=("vision", "text"))
    config, model, before, params = train_steps(lora, seed, model_type=model_type)
    only_adapters_and_unadapted_towers_changed(before, params, dora=True)
    merged = merge(params, lora)
    save_hf_checkpoint(tmp_path / "hf", config, merged)
    cls = {"idefics2": "Idefics2", "smolvlm": "SmolVLM"}[model_type] + "ForConditionalGeneration"
    reference = getattr(transformers, cls).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = np.random.default_rng(seed).integers(3, 1000, (1, 24))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids)).logits.numpy()
    ours = model.apply({"params": merged}, jnp.asarray(ids))
    assert rel_err(ours, ref) < 1e-4
