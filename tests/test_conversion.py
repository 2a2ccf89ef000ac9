"""Hugging Face <-> ours: round trips, the CLI, bfloat16, sharded files and the errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import build_hf_model, rel_err
from idefics_jax import Idefics2, load_checkpoint, load_hf_checkpoint, save_hf_checkpoint
from idefics_jax.config import ConfigError
from idefics_jax.checkpoints import CheckpointError
from idefics_jax.cli.convert import main as convert_main


def read_all(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def test_save_round_trip_is_bit_identical_and_loads_in_transformers(hf_dir, converted, tmp_path, seed):
    from transformers import Idefics2ForConditionalGeneration

    src, reference = hf_dir
    config, params = converted
    out = save_hf_checkpoint(tmp_path / "out", config, params, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert_bit_identical(read_all(src), read_all(out))

    reloaded = Idefics2ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    rng = np.random.default_rng([seed, 1])
    ids = torch.tensor(rng.integers(0, 99, size=(2, 24)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(input_ids=ids).logits.numpy(), reference(input_ids=ids).logits.numpy())
    ours = Idefics2(config).apply({"params": params}, jnp.asarray(ids.numpy()))
    assert rel_err(ours, reference(input_ids=ids).logits.detach().numpy()) < 1e-4


def test_cli_bfloat16_sharded_round_trip(tmp_path, seed):
    from transformers import Idefics2ForConditionalGeneration

    src = tmp_path / "hf_bf16"
    build_hf_model(seed + 1).to(torch.bfloat16).save_pretrained(src, max_shard_size="50KB")
    assert (src / "model.safetensors.index.json").exists()
    assert convert_main(["from-hf", str(src), str(tmp_path / "ckpt")]) == 0
    config, params = load_checkpoint(tmp_path / "ckpt", on_device=False)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    assert convert_main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--max-shard-size", "60KB"]) == 0
    assert_bit_identical(read_all(src), read_all(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert model.dtype == torch.bfloat16

    # --dtype float32 upcasts on the way in; the values are the bfloat16 values exactly.
    assert convert_main(["from-hf", str(src), str(tmp_path / "ckpt32"), "--dtype", "float32"]) == 0
    _, params32 = load_checkpoint(tmp_path / "ckpt32", on_device=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a.astype(np.float32), b)


def test_tied_word_embeddings(tmp_path, seed):
    model = build_hf_model(seed + 2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    config, params = load_hf_checkpoint(tmp_path / "tied")
    assert config.tie_word_embeddings and "lm_head" not in params
    ids = np.random.default_rng([seed, 2]).integers(0, 99, size=(1, 20))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = Idefics2(config).apply({"params": params}, jnp.asarray(ids))
    assert rel_err(ours, ref) < 1e-4


@pytest.fixture
def broken_copy(hf_dir, tmp_path):
    def make(edit):
        dst = tmp_path / "broken"
        shutil.copytree(hf_dir[0], dst)
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    return make


def test_missing_tensor_is_named(broken_copy):
    path = broken_copy(lambda t: t.pop("model.text_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.text_model\.layers\.1\.mlp\.up_proj\.weight.*\(96, 48\)"):
        load_hf_checkpoint(path)


def test_unexpected_tensor_is_named(broken_copy):
    path = broken_copy(lambda t: t.update({"model.text_model.layers.9.extra.weight": np.zeros((3, 4), np.float32)}))
    with pytest.raises(CheckpointError, match=r"Unexpected tensor 'model\.text_model\.layers\.9\.extra\.weight'.*\(3, 4\)"):
        load_hf_checkpoint(path)


def test_misshaped_tensor_names_both_shapes(broken_copy):
    def edit(t):
        t["model.connector.perceiver_resampler.latents"] = np.zeros((15, 48), np.float32)
    path = broken_copy(edit)
    with pytest.raises(CheckpointError, match=r"latents.*\(15, 48\).*\(16, 48\)"):
        load_hf_checkpoint(path)


def test_other_model_type_is_refused(hf_dir, tmp_path):
    dst = tmp_path / "llava"
    shutil.copytree(hf_dir[0], dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "llava"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type='llava'"):
        load_hf_checkpoint(dst)
    assert convert_main(["from-hf", str(dst), str(tmp_path / "ckpt")]) == 2
    assert not (tmp_path / "ckpt").exists()


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an idefics_jax checkpoint: config.json is missing"):
        load_checkpoint(tmp_path)


def test_from_hf_refuses_to_overwrite(hf_dir, tmp_path):
    assert convert_main(["from-hf", str(hf_dir[0]), str(tmp_path / "ckpt")]) == 0
    before = sorted(p.name for p in (tmp_path / "ckpt").rglob("*"))
    assert convert_main(["from-hf", str(hf_dir[0]), str(tmp_path / "ckpt")]) == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").rglob("*")) == before  # nothing lost


def test_loading_peak_host_memory_is_about_one_model(tmp_path, seed):
    """Tensors stream one by one: the peak is the model plus about one tensor, not two models."""
    import tracemalloc

    from conftest import HF_TINY

    text = dict(HF_TINY["text_config"], vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    build_hf_model(seed, text_config=text).save_pretrained(tmp_path / "hf")
    size = sum(t.nbytes for t in read_all(tmp_path / "hf").values())
    tracemalloc.start()
    _, params = load_hf_checkpoint(tmp_path / "hf", on_device=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(x.nbytes for x in jax.tree.leaves(params)) == size
    print(f"peak {peak / size:.3f} x model")
    assert peak < 1.35 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB model"
