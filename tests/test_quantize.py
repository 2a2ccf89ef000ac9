"""int8 weights for inference (`models/quantize.py`): the int8 path computes exactly what its weights
stand for, the logits stay near the float model's, a quantised checkpoint saves, loads and refuses the
Hugging Face export, and the command lines take `--quantize int8`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import rel_err
from idefics_jax import Idefics2, Idefics2Config, load_checkpoint
from idefics_jax.checkpoints import CheckpointError, load, save_hf_checkpoint
from idefics_jax.cli.convert import main as convert_main
from idefics_jax.config import PerceiverConfig, TextConfig, VisionConfig
from idefics_jax.inference.generate import Generator
from idefics_jax.models.quantize import SCALE, dequantized, param_bytes, quantize_params

# the benchmarks' ~80M-parameter model (benchmarks/train_step.py)
M80 = Idefics2Config(
    vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                        image_size=378, patch_size=14),
    perceiver=PerceiverConfig(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=8, resampler_head_dim=64,
                              num_key_value_heads=4),
    text=TextConfig(vocab_size=32003, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, sliding_window=4096),
    image_token_id=32001)
TINY = Idefics2Config.preset("tiny").replace(vision=Idefics2Config.preset("tiny").vision.replace(image_size=112))
# (largest logit error / largest logit, share of greedy choices the same) measured on random weights
# over 6 seeds: tiny 1.1-1.6%, 97-99%; 80M 4.8-6.5%, 81-94% (a random model's two best logits lie
# 2-4% of the largest apart, about the int8 error: trained models' margins are wider)
BOUNDS = {"tiny": (0.03, 0.93), "80M": (0.1, 0.75)}


def random_inputs(config, seed, rows=2, text=100):
    rng = np.random.default_rng(seed)
    side = config.vision.image_size
    ids = np.concatenate([rng.integers(3, 1000, 10), [config.image_token_id] * config.image_seq_len,
                          rng.integers(3, 1000, text)])[None].repeat(rows, 0)
    return ids, rng.uniform(-1, 1, (rows, 1, side, side, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["tiny", "80M"])
def test_int8_logits_stay_near_the_float_models(name, seed):
    """Every projection in int8 (per output channel): the int8 path equals float32 on the weights it
    stands for; against the float weights, logits within the bound and most greedy choices the
    same; the projections' bytes a quarter, the model's (embeddings and norms as they are) less than half."""
    config = TINY if name == "tiny" else M80
    model = Idefics2(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    quantized = quantize_params(params)
    flat = traverse_util.flatten_dict(quantized)
    kernels = [p for p in flat if p[-1] == "kernel" and flat[p].ndim == 2]
    assert kernels and all(flat[p].dtype == jnp.int8 and flat[(*p[:-1], SCALE)].shape == flat[p].shape[-1:]
                           for p in kernels)
    assert flat[("model", "text_model", "embed_tokens", "embedding")].dtype == jnp.float32
    ids, pixels = random_inputs(config, seed)
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, pixel_values=pixels))
    ours, exact, reference = (np.asarray(forward(p)) for p in (quantized, dequantized(quantized), params))
    assert rel_err(ours, exact) < 1e-5  # (x @ q) * s computes x @ (q * s)
    bound, agreement = BOUNDS[name]
    assert rel_err(ours, reference) < bound
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= agreement
    kernel_bytes = sum(flat[p].nbytes + flat[(*p[:-1], SCALE)].nbytes for p in kernels)
    float_kernel_bytes = sum(flat[p].size * 4 for p in kernels)
    assert kernel_bytes / float_kernel_bytes < 0.26 and param_bytes(quantized) / param_bytes(params) < 0.45


def test_quantised_checkpoint_saves_loads_and_refuses_the_hf_export(chat_dir, tmp_path, seed):
    """`convert from-hf --quantize int8` writes int8 weights; `load` reads them as they are (also in
    bfloat16, which leaves them int8) and they are `load(hf_dir, quantize="int8")`'s; generation
    runs on them; the Hugging Face export refuses them by name."""
    assert convert_main(["from-hf", str(chat_dir[0]), str(tmp_path / "q"), "--quantize", "int8"]) == 0
    (tmp_path / "q" / "tokenizer.model").write_bytes((chat_dir[0] / "tokenizer.model").read_bytes())
    config, stored = load_checkpoint(tmp_path / "q")
    assert stored["lm_head"]["kernel"].dtype == jnp.int8 and SCALE in stored["lm_head"]
    on_the_fly = load(chat_dir[0], quantize="int8")
    assert "int8 weights" in on_the_fly.description
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(on_the_fly.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    as_bf16 = load(tmp_path / "q", dtype=jnp.bfloat16).params
    assert as_bf16["lm_head"]["kernel"].dtype == jnp.int8 and as_bf16["lm_head"][SCALE].dtype == jnp.float32
    assert as_bf16["model"]["text_model"]["norm"]["scale"].dtype == jnp.bfloat16
    ids = np.random.default_rng(seed).integers(3, 100, (2, 12))
    tokens = Generator(Idefics2(config), stored).generate(ids, np.ones_like(ids), max_new_tokens=6)
    assert tokens.shape == (2, 6)
    with pytest.raises(CheckpointError, match="Cannot export int8 weights"):
        save_hf_checkpoint(tmp_path / "hf", config, stored)
    assert convert_main(["to-hf", str(tmp_path / "q"), str(tmp_path / "hf2")]) == 2


def test_command_lines_take_quantize():
    import argparse

    from idefics_jax.cli.common import add_device_arguments

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    assert parser.parse_args(["--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int4"])
    with pytest.raises(ValueError, match="quantize='int4' is not one of"):
        quantize_params({}, "int4")
