"""Idefics3 and SmolVLM (a Llama decoder, the pixel-shuffle connector) against transformers: logits of
tiny random models converted from their Hugging Face directories, and the export back."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import IMAGE_TOKEN_ID, rel_err
from helpers.inputs import make_batch
from helpers.successors import build_hf
from idefics_jax import Idefics2Config, Idefics3, SmolVLM, load_hf_checkpoint, save_hf_checkpoint
from idefics_jax.config import ConfigError

TOL = 1e-4
@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def reference(request, tmp_path_factory, seed):
    """(model type, Hugging Face directory, its model, our (config, params) read from it)."""
    path = tmp_path_factory.mktemp(request.param)
    model = build_hf(request.param, seed)
    model.save_pretrained(path)
    return request.param, path, model, load_hf_checkpoint(path, on_device=False)


CASES = {
    "text_only": dict(rows=[([20], []), ([13], [])], images=False),
    "one_image": dict(rows=[([5, 7], [(56, 56)])], images=True),
    "two_images": dict(rows=[([3, 4, 5], [(56, 56), (56, 56)]), ([6, 2], [(56, 56)])], images=True),
    "padded_batch_with_a_text_only_row": dict(rows=[([25], []), ([4, 6], [(56, 56)])], images=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(reference, case, seed):
    model_type, _, model, (config, params) = reference
    assert config.model_type == model_type and config.text.model_type == "llama"
    assert config.text.sliding_window is None and config.connector == "pixel_shuffle"
    rng = np.random.default_rng([seed, 60, list(CASES).index(case)])
    input_ids, mask, pixels, pixel_mask = make_batch(rng, CASES[case]["rows"], config.image_seq_len, vocab=IMAGE_TOKEN_ID)
    kwargs, theirs = {}, dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask))
    if CASES[case]["images"]:
        kwargs = dict(pixel_values=jnp.asarray(pixels), pixel_attention_mask=jnp.asarray(pixel_mask))
        theirs.update(pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3), pixel_attention_mask=torch.tensor(pixel_mask))
    with torch.no_grad():
        ref = model(**theirs).logits.numpy()
    cls = Idefics3 if model_type == "idefics3" else SmolVLM
    forward = jax.jit(lambda p, ids, m, kw: cls(config).apply({"params": p}, ids, attention_mask=m, **kw))
    ours = np.asarray(forward(params, jnp.asarray(input_ids), jnp.asarray(mask), kwargs))
    keep = mask.astype(bool)
    assert rel_err(ours[keep], ref[keep]) < TOL, f"{model_type} {case}: {rel_err(ours[keep], ref[keep]):.2e}"


def test_export_loads_bit_identically_in_transformers(reference, tmp_path):
    from transformers import AutoConfig, Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    model_type, path, model, (config, params) = reference
    save_hf_checkpoint(tmp_path, config, params)
    assert Idefics2Config.from_json_file(tmp_path / "config.json") == config
    assert AutoConfig.from_pretrained(tmp_path).model_type == model_type
    cls = Idefics3ForConditionalGeneration if model_type == "idefics3" else SmolVLMForConditionalGeneration
    back = cls.from_pretrained(tmp_path).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]


def test_successor_configs_are_read_strictly(reference):
    model_type, path, _, _ = reference
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(ConfigError, match="attention_bias=true"):
        Idefics2Config.from_hf_dict({**hf, "text_config": {**hf["text_config"], "attention_bias": True}})
    with pytest.raises(ConfigError, match="Unknown key 'scale_factr'"):
        Idefics2Config.from_hf_dict({**hf, "scale_factr": 2})
    with pytest.raises(ConfigError, match="model_type 'smolvlm' is fully autoregressive with the pixel_shuffle"):
        Idefics2Config.preset("tiny").replace(model_type="smolvlm")


def test_greedy_tokens_equal_transformers_generate(reference, seed):
    """Cached generation (no sliding window: the cache holds every column) on a padded batch with
    images and a text-only row."""
    from helpers.generation import NEW, assert_same_greedy_tokens, hf_generate
    from idefics_jax.inference.generate import Generator

    model_type, _, model, (config, params) = reference
    rng = np.random.default_rng([seed, 61])
    input_ids, mask, pixels, pixel_mask = make_batch(rng, [([4, 3], [(56, 56)]), ([9], [])], config.image_seq_len)
    expected, scores = hf_generate(model, input_ids, mask, pixels, pixel_mask, scores=True, eos_token_id=None)
    cls = Idefics3 if model_type == "idefics3" else SmolVLM
    ours = Generator(cls(config), jax.tree.map(jnp.asarray, params)).generate(input_ids, mask, pixels, pixel_mask,
                                                                             max_new_tokens=NEW)
    assert_same_greedy_tokens(ours, expected, scores)


def test_command_line_converts_both_ways(reference, tmp_path):
    """`convert from-hf` then `to-hf`: our checkpoint holds the successor's config, and the Hugging
    Face directory written back has the original tensors, bit for bit."""
    from safetensors.numpy import load_file

    from idefics_jax import load_checkpoint
    from idefics_jax.cli.convert import main as convert_main

    model_type, path, _, (config, _) = reference
    assert convert_main(["from-hf", str(path), str(tmp_path / "ours")]) == 0
    assert load_checkpoint(tmp_path / "ours")[0] == config
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    original = load_file(path / "model.safetensors")
    back = {k: v for file in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(file).items()}
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        np.testing.assert_array_equal(back[name], tensor, err_msg=name)
