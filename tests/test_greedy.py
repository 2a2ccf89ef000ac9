"""Greedy decoding (full recomputation) equals transformers' greedy `generate`."""

from __future__ import annotations

import numpy as np
import torch

from idefics_jax import Idefics2
from idefics_jax.inference.greedy import greedy_generate
from test_parity import make_batch


def test_greedy_matches_transformers_generate(hf_dir, converted, seed):
    rng = np.random.default_rng([seed, 300])
    config, params = converted
    input_ids, attention_mask, pixel_values, pixel_mask = make_batch(
        rng, [([4, 3], [(40, 36)]), ([9, 5], [(28, 52)]), ([12], [])], config.image_seq_len)
    pixel_values[2] = 0  # the third row has no image
    with torch.no_grad():
        out = hf_dir[1].generate(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                                 pixel_values=torch.tensor(pixel_values).permute(0, 1, 4, 2, 3),
                                 pixel_attention_mask=torch.tensor(pixel_mask), max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = out[:, input_ids.shape[1]:].numpy()
    ours = greedy_generate(Idefics2(config), params, input_ids, attention_mask, pixel_values, pixel_mask,
                           max_new_tokens=16)
    np.testing.assert_array_equal(ours, expected)
