"""Logits, vision-tower hidden states and Perceiver outputs against transformers' Idefics2."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import IMAGE_TOKEN_ID, rel_err
from idefics_jax import Idefics2
from idefics_jax.models.vision import patch_position_ids
from helpers.inputs import make_batch

TOL = 1e-4


def reference_logits(model, input_ids, attention_mask, pixel_values=None, pixel_mask=None):
    kwargs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask))
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.tensor(pixel_values).permute(0, 1, 4, 2, 3)
        kwargs["pixel_attention_mask"] = torch.tensor(pixel_mask)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def our_logits(converted, input_ids, attention_mask, pixel_values=None, pixel_mask=None):
    """Jitted, as users run it (the eager image-token check is tested on its own)."""
    config, params = converted
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(pixel_values=jnp.asarray(pixel_values), pixel_attention_mask=jnp.asarray(pixel_mask))
    forward = jax.jit(lambda p, ids, mask, kw: Idefics2(config).apply({"params": p}, ids, attention_mask=mask, **kw))
    return np.asarray(forward(params, jnp.asarray(input_ids), jnp.asarray(attention_mask), kwargs))


CASES = {
    "text_only": dict(rows=[([20], []), ([13], [])], images=False),
    "one_image": dict(rows=[([5, 7], [(40, 56)])], images=True),
    "two_images_different_sizes": dict(rows=[([3, 4, 5], [(56, 36), (24, 48)]), ([6, 2], [(32, 32)])], images=True),
    "first_row_without_image": dict(rows=[([25], []), ([4, 6], [(44, 28)])], images=True),
    "side_not_divisible_by_patch": dict(rows=[([2, 3], [(30, 45)])], images=True),
    "longer_than_sliding_window": dict(rows=[([30, 25, 11], [(56, 56), (17, 53)])], images=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, hf_dir, converted, seed):
    rng = np.random.default_rng([seed, list(CASES).index(case)])
    config = converted[0]
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(rng, CASES[case]["rows"], config.image_seq_len)
    if case == "longer_than_sliding_window":
        assert input_ids.shape[1] > 3 * config.text.sliding_window
    if not CASES[case]["images"]:
        pixel_values = pixel_mask = None
    ref = reference_logits(hf_dir[1], input_ids, attention_mask, pixel_values, pixel_mask)
    ours = our_logits(converted, input_ids, attention_mask, pixel_values, pixel_mask)
    keep = attention_mask.astype(bool)  # padded positions' logits are undefined in both
    assert ours.shape == ref.shape
    assert rel_err(ours[keep], ref[keep]) < TOL, f"{case}: relative error {rel_err(ours[keep], ref[keep]):.2e}"


def test_vision_tower_and_perceiver_match_reference(hf_dir, converted, seed):
    rng = np.random.default_rng([seed, 100])
    config, params = converted
    model = hf_dir[1]
    sizes = [(56, 40), (20, 52), (33, 17)]
    _, _, pixel_values, pixel_mask = make_batch(rng, [([1, 1, 1, 1], sizes)], config.image_seq_len)
    out = Idefics2(config).apply({"params": params}, jnp.asarray(pixel_values), jnp.asarray(pixel_mask),
                                 method=Idefics2.encode_images)
    pv = torch.tensor(pixel_values[0]).permute(0, 3, 1, 2)
    pm = torch.tensor(pixel_mask[0])
    p = config.vision.patch_size
    patch_mask = pm.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) == p * p
    np.testing.assert_array_equal(np.asarray(out["patch_mask"]), patch_mask.numpy())
    with torch.no_grad():
        vision = model.model.vision_model(pixel_values=pv, patch_attention_mask=patch_mask).last_hidden_state
        perceiver = model.model.connector(vision, attention_mask=patch_mask.view(len(sizes), -1))
    assert rel_err(out["vision_hidden_states"], vision.numpy()) < TOL
    assert rel_err(out["image_features"][0], perceiver.numpy()) < TOL
    assert np.asarray(out["real_images"]).tolist() == [[True, True, True]]


@pytest.mark.parametrize("image_size,patch_size", [(980, 14), (56, 4), (378, 14)])
def test_position_id_buckets_match_reference(image_size, patch_size):
    """Every patch-grid size 1..side, along both axes, gets the reference's bucketed ids."""
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    side = image_size // patch_size
    embeddings = Idefics2VisionEmbeddings(Idefics2VisionConfig(
        hidden_size=1, image_size=image_size, patch_size=patch_size, num_attention_heads=1, num_channels=1))
    with torch.no_grad():  # make the output equal to the position id
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        embeddings.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
    n = np.arange(1, side + 1)
    mask = np.zeros((side, side, side), bool)
    for i, (h, w) in enumerate(zip(n, n[::-1])):
        mask[i, :h, :w] = True
    pixels = torch.zeros(side, 1, side * patch_size, side * patch_size)
    with torch.no_grad():
        ref = embeddings(pixels, torch.tensor(mask))[..., 0].numpy().astype(np.int64)
    ours = np.asarray(patch_position_ids(jnp.asarray(mask), side))
    np.testing.assert_array_equal(ours, ref)


def test_image_token_count_mismatch_names_both_counts(converted, seed):
    rng = np.random.default_rng([seed, 200])
    config, params = converted
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(rng, [([3, 3], [(16, 16)])], config.image_seq_len)
    input_ids = input_ids[:, 1:]  # 5 text + 16 image tokens -> drop one text token: still consistent
    bad = np.concatenate([input_ids, np.full((1, 3), IMAGE_TOKEN_ID)], axis=1)  # 3 image tokens too many
    with pytest.raises(ValueError, match=r"19 image tokens.*1 images x 16 latents = 16"):
        Idefics2(config).apply({"params": params}, jnp.asarray(bad), pixel_values=jnp.asarray(pixel_values),
                               pixel_attention_mask=jnp.asarray(pixel_mask))
    # Totals that agree but rows that do not (row 0 has row 1's image tokens) are caught per row.
    row0 = np.concatenate([input_ids[0], np.full(16, IMAGE_TOKEN_ID)])
    two = np.stack([row0, np.full_like(row0, 7)])
    pv = np.concatenate([pixel_values, pixel_values], 0)
    pm = np.concatenate([pixel_mask, pixel_mask], 0)
    with pytest.raises(ValueError, match=r"Row 0 of the batch has 32 image tokens but 1 images"):
        Idefics2(config).apply({"params": params}, jnp.asarray(two), pixel_values=jnp.asarray(pv),
                               pixel_attention_mask=jnp.asarray(pm))


def test_bfloat16_matches_transformers_in_bfloat16(hf_dir, converted, seed):
    """bfloat16 weights and compute on both sides (transformers' eager attention, ours as users run
    it): ours within 2% of the largest logit of transformers' bfloat16 logits, and no further from
    the float32 reference than transformers' own bfloat16 run is, give or take a third."""
    import copy

    config, params = converted
    rng = np.random.default_rng([seed, 99])
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(
        rng, CASES["two_images_different_sizes"]["rows"], config.image_seq_len)
    reference32 = reference_logits(hf_dir[1], input_ids, attention_mask, pixel_values, pixel_mask)
    theirs = copy.deepcopy(hf_dir[1]).to(torch.bfloat16)
    kwargs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                  pixel_values=torch.tensor(pixel_values).permute(0, 1, 4, 2, 3).to(torch.bfloat16),
                  pixel_attention_mask=torch.tensor(pixel_mask))
    with torch.no_grad():
        theirs16 = theirs(**kwargs).logits.float().numpy()
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model = Idefics2(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    forward = jax.jit(lambda p, ids, mask, pv, pm: model.apply({"params": p}, ids, attention_mask=mask, pixel_values=pv,
                                                             pixel_attention_mask=pm))
    ours16 = np.asarray(forward(params16, input_ids, attention_mask, pixel_values, pixel_mask).astype(jnp.float32))
    keep = attention_mask.astype(bool)
    between, ours_off, theirs_off = (rel_err(a[keep], b[keep]) for a, b in
                                     [(ours16, theirs16), (ours16, reference32), (theirs16, reference32)])
    assert between < 2e-2
    assert ours_off < 1.33 * theirs_off + 1e-3


def test_long_rows_take_the_chunked_attention_and_match_reference(hf_dir, converted, seed, monkeypatch):
    """Rows of 500+ tokens, 30x the sliding window: on CPU `auto` computes the decoder's attention
    per chunk of queries (`chunked`), which must give transformers' logits as the plain path does."""
    from idefics_jax.ops import attention

    chosen = []
    select = attention.select_implementation
    monkeypatch.setattr(attention, "select_implementation",
                        lambda *args, **kwargs: chosen.append(select(*args, **kwargs)) or chosen[-1])
    config = converted[0]
    rng = np.random.default_rng([seed, 100])
    rows = [([290, 240], [(56, 48)]), ([40, 460], [(36, 56)])]
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(rng, rows, config.image_seq_len)
    assert input_ids.shape[1] >= 512 + config.text.sliding_window
    ref = reference_logits(hf_dir[1], input_ids, attention_mask, pixel_values, pixel_mask)
    ours = our_logits(converted, input_ids, attention_mask, pixel_values, pixel_mask)
    assert "chunked" in chosen, chosen
    keep = attention_mask.astype(bool)
    assert rel_err(ours[keep], ref[keep]) < TOL, f"relative error {rel_err(ours[keep], ref[keep]):.2e}"


def test_parity_at_the_default_optimisation_level(seed):
    """The suite compiles at XLA's -O0 (conftest); users run the default level. The parity tests and
    greedy generation against transformers, once more at that level, in a session of their own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("IDEFICS_TEST_OPTIMIZED") == "1":
        pytest.skip("this session is the optimised one")
    tests = Path(__file__).parent
    env = {**os.environ, "IDEFICS_TEST_OPTIMIZED": "1", "IDEFICS_TEST_SEED": str(seed), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": ""}  # no programs compiled at -O0 from the cache
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                           str(tests / "test_parity.py"), str(tests / "test_generate.py"), "-k",
                           "match_reference or matches_transformers or greedy_equals_transformers"],
                          cwd=tests.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"(\d+) passed", done.stdout) and int(re.search(r"(\d+) passed", done.stdout)[1]) >= 10, \
        done.stdout[-2000:]
