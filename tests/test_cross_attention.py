"""The cross-attention architecture (`architecture="cross_attention"`): its gated blocks against a plain
reference, the identity while the gates are 0, packed rows, cached generation, and what it refuses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import IMAGE_TOKEN_ID, rel_err
from helpers.inputs import make_batch
from helpers.training import open_gates
from idefics_jax import Idefics2, Idefics2Config
from idefics_jax.checkpoints.hf import CheckpointError, save_hf_checkpoint
from idefics_jax.config import ConfigError
from idefics_jax.inference.engine import decode, prefill
from idefics_jax.models.cross_attention import GatedCrossAttentionLayer, image_context
from idefics_jax.models.lora import tower_of


def cross_config(every: int = 1, **changes) -> Idefics2Config:
    c = Idefics2Config.preset("tiny")
    return c.replace(vision=c.vision.replace(image_size=56, patch_size=7), text=c.text.replace(sliding_window=16),
                     perceiver=c.perceiver.replace(resampler_n_latents=8), image_token_id=IMAGE_TOKEN_ID,
                     architecture="cross_attention", cross_attention_every=every, **changes)


def init(model, seed):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])


def reference_block(p, config, x, features, marker_pos, marker_seg, n_images, positions, segments):
    """The gated block written out per token: the keys of the images whose marker is at or before the
    token in its segment, softmax attention per head (grouped-query), tanh gates, SwiGLU."""
    t = config.text
    heads, kv_heads, d = t.num_attention_heads, t.num_key_value_heads, t.attention_head_dim
    rms = lambda h, scale: h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + t.rms_norm_eps) * scale
    a = p["cross_attn"]
    per_image = features.shape[2]
    rows = []
    for b in range(x.shape[0]):
        h = rms(x[b], p["input_layernorm"]["scale"])
        keys = features[b].reshape(-1, features.shape[-1])
        q = (h @ a["q_proj"]["kernel"]).reshape(-1, heads, d)
        k = jnp.repeat((keys @ a["k_proj"]["kernel"]).reshape(-1, kv_heads, d), heads // kv_heads, axis=1)
        v = jnp.repeat((keys @ a["v_proj"]["kernel"]).reshape(-1, kv_heads, d), heads // kv_heads, axis=1)
        out = []
        for i in range(x.shape[1]):
            seen = [j * per_image + f for j in range(n_images[b]) for f in range(per_image)
                    if marker_pos[b][j] <= positions[b, i] and marker_seg[b][j] == segments[b, i]]
            if not seen:
                out.append(jnp.zeros(t.hidden_size))
                continue
            scores = jnp.einsum("hd,khd->hk", q[i], k[np.array(seen)]) / np.sqrt(d)
            attn = jnp.einsum("hk,khd->hd", jax.nn.softmax(scores, -1), v[np.array(seen)]).reshape(-1)
            out.append(jnp.tanh(p["alpha_cross_attn"][0]) * (attn @ a["o_proj"]["kernel"]))
        mask = jnp.array([bool(jnp.any(o != 0)) for o in out])[:, None]
        y = x[b] + jnp.stack(out)
        m = p["mlp"]
        g = rms(y, p["post_attention_layernorm"]["scale"])
        mlp = (jax.nn.silu(g @ m["gate_proj"]["kernel"]) * (g @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        rows.append(y + jnp.where(mask, jnp.tanh(p["alpha_dense"][0]) * mlp, 0))
    return jnp.stack(rows)


def test_block_forward_and_gradient_equal_a_plain_reference(seed):
    """Two packed rows: segments with and without images, two images in one segment, one in the next,
    a padding image slot. Forward and the gradients (input and every parameter) equal the reference."""
    config = cross_config()
    rng = np.random.default_rng([seed, 50])
    hidden, per_image = config.text.hidden_size, 3
    segments = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]])
    positions = np.stack([np.concatenate([np.arange((s == k).sum()) for k in np.unique(s)])
                          for s in segments]).astype(np.int32)  # restarting at 0 in each segment
    is_image = np.zeros(segments.shape, bool)
    is_image[0, [1, 4, 8]] = True  # segment 1: images 0 and 1; segment 2: image 2
    is_image[1, [6]] = True  # segment 2 only
    real = np.array([[True, True, True], [False, True, False]])  # row 1's image in slot 1
    features = jnp.asarray(rng.normal(size=(2, 3, per_image, hidden)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 12, hidden)), jnp.float32)
    layer = GatedCrossAttentionLayer(config.text)
    context = image_context(features, jnp.asarray(real), jnp.asarray(is_image), jnp.asarray(positions),
                            jnp.asarray(segments))
    params = open_gates(nn.meta.unbox(layer.init(jax.random.PRNGKey(seed), x, positions, segments, context)["params"]),
                        0.7)
    ranked = jnp.stack([features[0], features[1][jnp.array([1, 0, 2])]])  # real images first, in order
    marker_pos = [[positions[0, 1], positions[0, 4], positions[0, 8]], [positions[1, 6]]]
    marker_seg = [[1, 1, 2], [2]]
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def ours(p, x):
        return jnp.sum(layer.apply({"params": p}, x, positions, segments, context) * weights)

    def theirs(p, x):
        return jnp.sum(reference_block(p, config, x, ranked, marker_pos, marker_seg, [3, 1], positions, segments)
                       * weights)

    out = layer.apply({"params": params}, x, positions, segments, context)
    ref = reference_block(params, config, x, ranked, marker_pos, marker_seg, [3, 1], positions, segments)
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[1, :6]), np.asarray(x[1, :6]))  # before row 1's only image
    g_ours, g_ref = jax.grad(ours, argnums=(0, 1))(params, x), jax.grad(theirs, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-4
    assert float(jnp.abs(g_ours[0]["cross_attn"]["k_proj"]["kernel"]).max()) > 0


def test_gates_at_zero_give_the_text_only_decoders_logits(seed):
    """A new model (gates at 0) is the pre-trained decoder exactly, images or not; opened gates change
    the tokens from the first image's marker on, and only those."""
    config = cross_config(every=2)
    config = config.replace(text=config.text.replace(num_hidden_layers=3))
    model = Idefics2(config)
    params = init(model, seed)
    assert sorted(k for k in params["model"] if k.startswith("gated")) == ["gated_cross_attn_layers_0",
                                                                          "gated_cross_attn_layers_1"]
    rng = np.random.default_rng([seed, 51])
    input_ids, mask, pixels, pixel_mask = make_batch(rng, [([4, 3, 2], [(40, 36), (28, 52)]), ([3, 6], [(44, 20)])],
                                                     config.image_seq_len)
    with_images = model.apply({"params": params}, input_ids, attention_mask=mask, pixel_values=pixels,
                              pixel_attention_mask=pixel_mask)
    decoder = Idefics2(config.replace(architecture="fully_autoregressive"))
    text_params = {**params, "model": {k: v for k, v in params["model"].items() if not k.startswith("gated")}}
    text_only = decoder.apply({"params": text_params}, input_ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(with_images), np.asarray(text_only))
    opened = model.apply({"params": open_gates(params)}, input_ids, attention_mask=mask, pixel_values=pixels,
                         pixel_attention_mask=pixel_mask)
    changed = np.abs(np.asarray(opened) - np.asarray(text_only)).max(-1) > 0
    first_marker = np.argmax(input_ids == IMAGE_TOKEN_ID, axis=1)
    for b in range(2):
        assert not changed[b, :first_marker[b]].any() and changed[b, first_marker[b]:].all(), changed[b]


def test_packed_row_equals_each_sample_alone(seed):
    """Three samples in one row (two images, none, one): each segment's logits equal the sample's alone."""
    config = cross_config()
    model = Idefics2(config)
    params = open_gates(init(model, seed))
    rng = np.random.default_rng([seed, 52])
    samples = [([3, 4, 2], [(40, 36), (28, 52)]), ([6], []), ([2, 5], [(44, 20)])]
    alone, ids, segs, pos, pixels, pixel_mask = [], [], [], [], [], []
    for s, sample in enumerate(samples):
        input_ids, _, pix, pmask = make_batch(rng, [sample], config.image_seq_len)
        kwargs = dict(pixel_values=pix, pixel_attention_mask=pmask) if sample[1] else {}
        alone.append(np.asarray(model.apply({"params": params}, input_ids, **kwargs))[0])
        ids.append(input_ids[0])
        segs.append(np.full(input_ids.shape[1], s + 1))
        pos.append(np.arange(input_ids.shape[1]))
        for i in range(len(sample[1])):
            pixels.append(pix[0, i])
            pixel_mask.append(pmask[0, i])
    h, w = max(p.shape[0] for p in pixels), max(p.shape[1] for p in pixels)
    slot_pixels = np.zeros((1, len(pixels), h, w, 3), np.float32)
    slot_mask = np.zeros((1, len(pixels), h, w), bool)
    for i, (p, m) in enumerate(zip(pixels, pixel_mask)):
        slot_pixels[0, i, :p.shape[0], :p.shape[1]], slot_mask[0, i, :m.shape[0], :m.shape[1]] = p, m
    packed = np.asarray(model.apply({"params": params}, np.concatenate(ids)[None], pixel_values=slot_pixels,
                                    pixel_attention_mask=slot_mask, segment_ids=np.concatenate(segs)[None],
                                    positions=np.concatenate(pos)[None]))[0]
    start = 0
    for s, logits in enumerate(alone):
        assert rel_err(packed[start:start + len(logits)], logits) < 1e-5, s
        start += len(logits)


def test_cached_decoding_equals_full_forward(seed):
    """Prefill keeps the images in the cache; teacher-forced decode steps past the sliding window give
    the full pass's logits (left-padded rows, one without images)."""
    config = cross_config()
    model = Idefics2(config)
    params = open_gates(init(model, seed))
    rng = np.random.default_rng([seed, 53])
    input_ids, mask, pixels, pixel_mask = make_batch(rng, [([5, 2, 3], [(40, 36), (28, 52)]), ([3], [])],
                                                     config.image_seq_len)
    pixels[1], pixel_mask[1] = 0, False
    forced = rng.integers(3, IMAGE_TOKEN_ID, size=(2, 2 * config.text.sliding_window + 3))
    full_ids = np.concatenate([input_ids, forced], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(forced)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(model.apply({"params": params}, full_ids, attention_mask=full_mask, positions=positions,
                                  pixel_values=pixels, pixel_attention_mask=pixel_mask))
    state = jax.jit(lambda p: prefill(model, p, input_ids, mask, pixels, pixel_mask,
                                      max_columns=full_ids.shape[1]))(params)
    assert state.cache.images is not None
    step = jax.jit(lambda p, s, t: decode(model, p, s, t))
    prompt = input_ids.shape[1]
    for t in range(forced.shape[1]):
        assert rel_err(state.logits, full[:, prompt + t - 1]) < 1e-5, t
        state = step(params, state, forced[:, t])
    assert rel_err(state.logits, full[:, -1]) < 1e-5


def test_cross_attention_is_checked_named_and_refused_where_it_cannot_go(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cross_attention'"):
        cross_config().replace(architecture="cross_atention")
    with pytest.raises(ConfigError, match="cross_attention_every=0"):
        cross_config(every=0)
    config = cross_config()
    assert config.image_seq_len == 1 and config.image_features_len == 8
    assert Idefics2Config.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(CheckpointError, match="architecture 'cross_attention' has no Hugging Face"):
        save_hf_checkpoint({}, config, tmp_path / "hf")
    with pytest.raises(ValueError, match="scan_layers=False"):
        init(Idefics2(config, scan_layers=True), 0)
    # the blocks are new parameters, trained with the connector when the backbones are frozen
    assert tower_of(("model", "gated_cross_attn_layers_0", "cross_attn", "q_proj", "kernel")) == "connector"
