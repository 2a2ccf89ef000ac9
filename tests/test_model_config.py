"""Model config: presets, Hugging Face config.json in and out, strict keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idefics_jax import Idefics2, Idefics2Config
from idefics_jax.config import ConfigError, TextConfig

# An Idefics2 config.json in the transformers 4.40 layout: every generic PretrainedConfig key is
# dumped into each section, and "model_type" of the sub-configs is "idefics2".
GENERIC = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "begin_suppress_tokens": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False,
}
HUB_8B = {
    "_name_or_path": "HuggingFaceM4/idefics2-8b",
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 32001,
    "model_type": "idefics2",
    "torch_dtype": "float32",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "perceiver_config": {**GENERIC, "hidden_act": "silu", "model_type": "idefics2", "num_key_value_heads": 4,
                         "resampler_depth": 3, "resampler_head_dim": 96, "resampler_n_heads": 16,
                         "resampler_n_latents": 64},
    "text_config": {**GENERIC, "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
                    "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                    "sliding_window": 4096, "vocab_size": 32003, "hidden_act": "silu", "bos_token_id": 1,
                    "eos_token_id": 2, "tie_word_embeddings": False},
    "vision_config": {**GENERIC, "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                      "model_type": "idefics2", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}


def test_idefics2_8b_preset_matches_the_hub_config():
    preset = Idefics2Config.preset("idefics2-8b")
    assert Idefics2Config.from_hf_dict(HUB_8B) == preset
    v, p, t = preset.vision, preset.perceiver, preset.text
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, v.num_patches_per_side) == (1152, 27, 980, 14, 70)
    assert (p.resampler_n_latents, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim,
            p.num_key_value_heads) == (64, 3, 16, 96, 4)
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
            t.num_key_value_heads, t.sliding_window) == (32, 4096, 14336, 32, 8, 4096)


def test_8b_parameter_count():
    """Idefics2-8B has about 8.4B parameters; count them without allocating any."""
    from idefics_jax.checkpoints import abstract_params

    params = abstract_params(Idefics2Config.preset("idefics2-8b"))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert 8.3e9 < count < 8.5e9, count


def test_transformers_reads_our_config_json(tmp_path):
    from transformers import Idefics2Config as HFConfig

    ours = Idefics2Config.preset("tiny").replace(tie_word_embeddings=True)
    ours.to_json_file(tmp_path / "config.json")
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.vision_config.hidden_size == ours.vision.hidden_size
    assert hf.perceiver_config.resampler_n_latents == ours.perceiver.resampler_n_latents
    assert hf.text_config.sliding_window == ours.text.sliding_window
    assert hf.text_config.num_key_value_heads == ours.text.num_key_value_heads
    assert hf.image_token_id == ours.image_token_id and hf.tie_word_embeddings
    assert Idefics2Config.from_hf_dict(hf.to_dict()) == ours


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"Unknown key 'slidng_window'.*Did you mean 'sliding_window'"):
        TextConfig.from_dict({"slidng_window": 8})
    with pytest.raises(ConfigError, match=r"'num_hiden_layers' in Idefics2Config.vision.*'num_hidden_layers'"):
        Idefics2Config.from_dict({"vision": {"num_hiden_layers": 2}})
    with pytest.raises(ConfigError, match="Unknown key 'rope_thetta'"):
        Idefics2Config.preset("tiny").text.replace(rope_thetta=1.0)
    bad = {**HUB_8B, "text_config": {**HUB_8B["text_config"], "num_kv_heads": 8}}
    with pytest.raises(ConfigError, match="'num_kv_heads' in config.json text_config"):
        Idefics2Config.from_hf_dict(bad)
    with pytest.raises(ConfigError, match="Unknown preset 'idefics2-7b'.*'idefics2-8b'"):
        Idefics2Config.preset("idefics2-7b")


def test_unsupported_or_inconsistent_values_are_errors():
    with pytest.raises(ConfigError, match="model_type='idefics'; expected one of"):
        Idefics2Config.from_hf_dict({**HUB_8B, "model_type": "idefics"})
    with pytest.raises(ConfigError, match="model_type 'idefics3' has a perceiver_config"):
        Idefics2Config.from_hf_dict({**HUB_8B, "model_type": "idefics3"})
    linear = {**HUB_8B, "text_config": {**HUB_8B["text_config"], "rope_scaling": {"type": "linear", "factor": 2.0}}}
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        Idefics2Config.from_hf_dict(linear)
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        TextConfig(num_attention_heads=6, num_key_value_heads=4).validate()
    with pytest.raises(ConfigError, match="image_token_id=5000 is outside the vocabulary"):
        Idefics2Config.preset("tiny").replace(image_token_id=5000)


@pytest.mark.parametrize("preset", ["tiny"])
def test_bfloat16_compute_and_params(preset):
    """bf16 compute (f32 or bf16 params) stays close to f32 and keeps the requested dtypes."""
    config = Idefics2Config.preset(preset)
    rng = np.random.default_rng()
    n = config.image_seq_len
    ids = np.concatenate([rng.integers(3, 1000, 6), [config.image_token_id] * n, rng.integers(3, 1000, 6)])[None]
    pixels = rng.uniform(-1, 1, (1, 1, 56, 84, 3)).astype(np.float32)
    init = jax.jit(Idefics2(config).init)
    params = nn_unbox(init(jax.random.PRNGKey(int(rng.integers(1 << 30))), jnp.zeros((1, 1), jnp.int32))["params"])
    run = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, ids, pixel_values=pixels))(p)
    ref = run(Idefics2(config), params)
    bf16 = run(Idefics2(config, dtype=jnp.bfloat16), params)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    both = run(Idefics2(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), params16)
    assert bf16.dtype == jnp.bfloat16 and both.dtype == jnp.bfloat16
    for out in (bf16, both):
        err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
        assert err < 5e-2, err
    init16 = jax.eval_shape(Idefics2(config, param_dtype=jnp.bfloat16).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))
    assert {x.dtype for x in jax.tree.leaves(nn_unbox(init16))} == {jnp.dtype(jnp.bfloat16)}


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)
