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


def test_to_hf_refuses_a_directory_that_is_not_empty_unless_told(hf_dir, tmp_path, capsys):
    """Without --overwrite nothing is touched; with it, the shards of the earlier export that the new
    index does not name are removed."""
    assert convert_main(["from-hf", str(hf_dir[0]), str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "out"
    assert convert_main(["to-hf", str(tmp_path / "ckpt"), str(out), "--max-shard-size", "40KB"]) == 0
    many = sorted(p.name for p in out.iterdir())
    assert len([n for n in many if n.endswith(".safetensors")]) > 2
    config = (out / "config.json").read_text()
    assert convert_main(["to-hf", str(tmp_path / "ckpt"), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == many
    assert (out / "config.json").read_text() == config
    assert convert_main(["to-hf", str(tmp_path / "ckpt"), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert_bit_identical(read_all(hf_dir[0]), read_all(out))


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


RUNTIME = 128 * 2**20  # what a conversion may hold beyond 1.3 copies, whatever the model's size


def random_checkpoint(config, directory, seed: int) -> int:
    """A Hugging Face directory of random float32 weights for `config`; its bytes."""
    from idefics_jax.checkpoints import abstract_params

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract_params(config))
    save_hf_checkpoint(directory, config, params)
    return sum(x.nbytes for x in jax.tree.leaves(params))


def test_conversion_holds_about_one_copy_of_the_model(tmp_path, seed):
    """Each direction of the command line, in a process of its own on a ~480 MB model, adds at its
    peak little beyond what it must hold, the runtime warmed up first (a constant for orbax's and
    tensorstore's buffers, `RUNTIME`): `from-hf` one copy of the model (orbax saves the whole tree)
    and a bounded window of tensors on their way, at most 1.3x the model's bytes; `to-hf`, which
    reads 48 MB groups here, two groups (and tensorstore's buffers of the one being read) and the
    tensor being written, under half the model.
    Holding the whole tree twice, as conversion did, would take 2x."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import xla_flags
    from idefics_jax import host_memory
    from idefics_jax.config import Idefics2Config

    tiny = Idefics2Config.preset("tiny")
    wide = tiny.replace(text=tiny.text.replace(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                                               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2))
    size = random_checkpoint(wide, tmp_path / "hf", seed)
    random_checkpoint(tiny, tmp_path / "warmup", seed)
    script = str(Path(__file__).parent / "helpers" / "convert_memory.py")
    # glibc's defaults, as the command has them (the suite's processes keep freed memory: conftest)
    env = {k: v for k, v in os.environ.items() if k not in host_memory.ENVIRONMENT}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    group = 48 * 10**6
    for command, source, destination, bound in [("from-hf", "hf", "ours", 1.3 * size),
                                                ("to-hf", "ours", "back", size / 2)]:
        done = subprocess.run([sys.executable, script, str(tmp_path / "warmup"), command, str(tmp_path / source),
                               str(tmp_path / destination), str(group)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        added = json.loads(done.stdout.strip().splitlines()[-1])["added"]
        assert added <= bound + RUNTIME, f"{command} added {added / 1e6:.0f} MB at its peak for a {size / 1e6:.0f} MB model"
    assert_bit_identical(read_all(tmp_path / "hf"), read_all(tmp_path / "back"))


def test_checkpoints_written_with_ocdbt_still_load(converted, tmp_path):
    """Our params used to be saved as one OCDBT store (orbax's default): such checkpoints load as before."""
    import orbax.checkpoint as ocp

    config, params = converted
    (tmp_path / "old").mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "old" / "params", params)
    config.to_json_file(tmp_path / "old" / "config.json")
    loaded_config, loaded = load_checkpoint(tmp_path / "old", on_device=False)
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_safetensors_writer_names_a_tensor_out_of_order_and_removes_an_incomplete_file(tmp_path):
    from idefics_jax.checkpoints.hf import SafetensorsWriter

    entries = [("a", np.float32, (2, 3)), ("b", ml_dtypes.bfloat16, (4,))]
    with SafetensorsWriter(str(tmp_path / "ok.safetensors"), entries) as out:
        out.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
        out.write("b", np.ones(4, ml_dtypes.bfloat16))
    read = load_file(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(read["a"], np.arange(6).reshape(2, 3))
    assert read["b"].dtype == ml_dtypes.bfloat16
    with pytest.raises(CheckpointError, match=r"expected tensor \('a'"):
        with SafetensorsWriter(str(tmp_path / "bad.safetensors"), entries) as out:
            out.write("b", np.ones(4, ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match="1 tensor\\(s\\) never written"):
        with SafetensorsWriter(str(tmp_path / "short.safetensors"), entries) as out:
            out.write("a", np.zeros((2, 3), np.float32))
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "short.safetensors").exists()
