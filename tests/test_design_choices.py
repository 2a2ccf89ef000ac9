"""The paper's design choices as switches: the connector (Perceiver, no pooling, pixel shuffle) and
square image sizing, checked against plain references; the default stays Idefics2 (test_parity.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idefics_jax import Idefics2Config
from idefics_jax.checkpoints.hf import CheckpointError, save_hf_checkpoint
from idefics_jax.config import ConfigError
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.models.connector import Connector, pixel_shuffle


def tiny(connector: str, image_size: int = 56, **changes) -> Idefics2Config:
    config = Idefics2Config.preset("tiny")
    return config.replace(vision=config.vision.replace(image_size=image_size, patch_size=7), connector=connector,
                          **changes)


@pytest.mark.parametrize("r", [2, 4])
def test_pixel_shuffle_equals_idefics3s(seed, r):
    import torch
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = np.random.default_rng([seed, 40]).normal(size=(3, 16 * 16, 6)).astype(np.float32)
    theirs = Idefics3Connector.pixel_shuffle(None, torch.from_numpy(x), r).numpy()
    ours = pixel_shuffle(jnp.asarray(x).reshape(3, 16, 16, 6), r)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def reference_connector(params, config: Idefics2Config, hidden, grid: tuple[int, int]):
    """The connector written out by hand: the square's patches in row-major order; pixel shuffle
    by index arithmetic; SwiGLU with silu."""
    n, d = hidden.shape[0], hidden.shape[-1]
    side = config.vision.num_patches_per_side
    square = hidden.reshape(n, *grid, d)[:, :side, :side]
    p = params["modality_projection"]
    if config.connector == "pixel_shuffle":
        r = config.pixel_shuffle_factor
        blocks = [jnp.concatenate([square[:, i * r + a, j * r + c] for a in range(r) for c in range(r)], axis=-1)
                  for i in range(side // r) for j in range(side // r)]
        return jnp.stack(blocks, axis=1) @ p["proj"]["kernel"]
    x = square.reshape(n, side * side, d)
    gate, up = x @ p["gate_proj"]["kernel"], x @ p["up_proj"]["kernel"]
    return (jax.nn.silu(gate) * up) @ p["down_proj"]["kernel"]


@pytest.mark.parametrize("connector", ["mlp", "pixel_shuffle"])
def test_connector_forward_and_gradient_equal_a_plain_reference(seed, connector):
    config = tiny(connector)
    rng = np.random.default_rng([seed, 41])
    grid = (10, 9)  # a bucket larger than the 8 x 8 square: its top-left square is the image
    hidden = jnp.asarray(rng.normal(size=(3, grid[0] * grid[1], config.vision.hidden_size)), jnp.float32)
    mask = jnp.ones((3, *grid), bool)
    module = Connector(config)
    params = module.init(jax.random.PRNGKey(seed % 1000), hidden, mask)["params"]
    params = nn.meta.unbox(params)
    ours = module.apply({"params": params}, hidden, mask)
    theirs = reference_connector(params, config, hidden, grid)
    assert ours.shape == (3, config.image_seq_len, config.text.hidden_size)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=ours.shape), jnp.float32)
    loss = lambda f: lambda p, h: jnp.sum(f(p, h) * cotangent)
    ours_grad = jax.grad(loss(lambda p, h: module.apply({"params": p}, h, mask)), argnums=(0, 1))(params, hidden)
    theirs_grad = jax.grad(loss(lambda p, h: reference_connector(p, config, h, grid)), argnums=(0, 1))(params, hidden)
    for a, b in zip(jax.tree_util.tree_leaves(ours_grad), jax.tree_util.tree_leaves(theirs_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_connector_choices_count_their_tokens_and_are_checked(tmp_path):
    assert [tiny(c).image_seq_len for c in ("perceiver", "mlp", "pixel_shuffle")] == [64, 64, 16]
    assert tiny("pixel_shuffle", pixel_shuffle_factor=4).image_seq_len == 4
    with pytest.raises(ConfigError, match="pixel_shuffle_factor=3 does not divide the 8 patches per side"):
        tiny("pixel_shuffle", pixel_shuffle_factor=3)
    with pytest.raises(ConfigError, match="did you mean 'mlp'"):
        tiny("mpl")
    shuffled = tiny("pixel_shuffle", pixel_shuffle_factor=4)
    assert Idefics2Config.from_hf_dict(shuffled.to_hf_dict()) == shuffled  # our checkpoints' config.json
    assert "connector" not in tiny("perceiver").to_hf_dict()  # transformers' Idefics2 config, unchanged
    with pytest.raises(CheckpointError, match="connector 'mlp' has no Hugging Face Idefics2 counterpart"):
        save_hf_checkpoint(tmp_path / "hf", tiny("mlp"), {})
    assert not (tmp_path / "hf").exists()


def test_square_sizing_resizes_every_image_and_crop_to_the_side(seed):
    rng = np.random.default_rng([seed, 42])
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 90), (300, 41), (56, 56)]]
    for split in (False, True):
        processor = ImageProcessor(longest_edge=56, shortest_edge=28, do_image_splitting=split, image_sizing="square")
        for image in images:
            crops = processor.process_uint8(image)
            assert len(crops) == (5 if split else 1) and all(c.shape == (56, 56, 3) for c in crops)
    kept = ImageProcessor(longest_edge=56, shortest_edge=28).process_uint8(images[0])[0]
    assert kept.shape == (28, 56, 3)
    with pytest.raises(ValueError, match="image_sizing 'squared' is not one of"):
        ImageProcessor(image_sizing="squared")


def test_runs_refuse_a_connector_without_square_images():
    from helpers.training import load_config
    from idefics_jax.train.run import check_image_sizing

    config = load_config("tiny")
    config.model.connector = "mlp"
    with pytest.raises(ValueError, match="connector=mlp takes square images of model.vision.image_size=112 px; "
                                         "source 'conversations' has image_sizing=keep_aspect"):
        check_image_sizing(config, tiny("mlp", image_size=112))
    config.data.image_sizing = "square"
    check_image_sizing(config, tiny("mlp", image_size=112))


def test_training_regimes_name_what_trains():
    """frozen: the connector alone; lora: the connector and adapters on both backbones (rank 16
    unless set); full: everything. A regime beside keys that contradict it is refused."""
    from helpers.training import load_config
    from idefics_jax.train.run import build_run

    counts = {}
    for regime in ("frozen", "lora", "full"):
        config = load_config("tiny")
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        config.train.regime = regime
        run = build_run(config)
        params = run.init_state(jax.random.PRNGKey(0)).params
        counts[regime] = run.count_trainable(params)
        if regime == "lora":
            assert run.lora.rank == 16 and run.lora.towers == ("vision", "text")
        else:
            assert run.lora is None
    connector = sum(x.size for x in jax.tree_util.tree_leaves(params["model"]["connector"]))
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert counts["frozen"] == connector and counts["full"] == total
    assert connector < counts["lora"] < total
    config = load_config("tiny")
    for key, value, message in [("regime", "partial", "not one of"), ("freeze", ["vision"], "leave train.freeze empty")]:
        bad = load_config("tiny")
        bad.train.regime = "frozen" if key != "regime" else value
        if key != "regime":
            bad.train[key] = value
        with pytest.raises(ValueError, match=message):
            build_run(bad)
    config.train.regime, config.train.lora.rank = "full", 8
    with pytest.raises(ValueError, match="trains no adapters"):
        build_run(config)


def test_backbone_sizes_resize_width_and_depth_only():
    from helpers.training import load_config
    from idefics_jax.config import TEXT_SIZES, VISION_SIZES, model_config, with_backbone_sizes

    base = Idefics2Config.preset("tiny")
    assert with_backbone_sizes(base, "tiny", "tiny") == base  # the tiny sizes are the tiny preset's
    bigger = with_backbone_sizes(base, text="small")
    assert bigger.text.hidden_size == TEXT_SIZES["small"]["hidden_size"] and bigger.text.head_dim == 64
    assert (bigger.text.vocab_size, bigger.text.sliding_window) == (base.text.vocab_size, base.text.sliding_window)
    config = load_config("tiny")
    config.model.vision_size = "small"
    vision = model_config(config.model).vision
    assert vision.num_hidden_layers == VISION_SIZES["small"]["num_hidden_layers"] and vision.image_size == 112
    config.model.vision_size = "smal"
    with pytest.raises(ConfigError, match="vision_size 'smal' is not one of .*did you mean 'small'"):
        model_config(config.model)


def test_frozen_cross_attention_trains_its_blocks_and_the_connector():
    from helpers.training import load_config
    from idefics_jax.train.run import build_run

    config = load_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config.model.architecture, config.model.cross_attention_every = "cross_attention", 1
    config.train.regime = "frozen"
    run = build_run(config)
    params = run.init_state(jax.random.PRNGKey(0)).params
    new = [params["model"][k] for k in params["model"] if k == "connector" or k.startswith("gated_cross_attn_layers")]
    assert len(new) == 3  # the connector and a block before each of the 2 decoder layers
    assert run.count_trainable(params) == sum(x.size for x in jax.tree_util.tree_leaves(new))


def test_a_pixel_shuffle_run_with_a_llama_decoder_is_an_idefics3():
    """The grid's pixel-shuffle variant on a Llama decoder, named idefics3, exports as Idefics3 (the
    conversion itself: tests/test_idefics3.py); on Mistral under idefics2 it is refused."""
    from helpers.training import load_config
    from idefics_jax.config import model_config

    config = load_config("tiny")
    config.model.connector, config.model.model_type = "pixel_shuffle", "idefics3"
    config.model.text.model_type, config.model.text.sliding_window = "llama", None
    idefics3 = model_config(config.model)
    assert idefics3.hf_architecture_error() is None
    assert idefics3.to_hf_dict()["architectures"] == ["Idefics3ForConditionalGeneration"]
    config.model.model_type = "idefics2"
    assert "no Hugging Face Idefics2 counterpart" in model_config(config.model).hf_architecture_error()
