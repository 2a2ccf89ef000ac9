"""Greedy tokens against transformers' `generate`, with the near-ties that excuse a difference."""

from __future__ import annotations

import numpy as np
import torch

NEW = 32


def hf_generate(model, input_ids, attention_mask, pixel_values=None, pixel_mask=None, scores=False, **kwargs):
    """transformers' new tokens `[batch, new]`; with `scores`, also the scores its greedy choices
    were made from, `[batch, new, vocab]` (after its logits processors)."""
    inputs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask))
    if pixel_values is not None:
        inputs["pixel_values"] = torch.tensor(pixel_values).permute(0, 1, 4, 2, 3)
        inputs["pixel_attention_mask"] = torch.tensor(pixel_mask)
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_scores=True)
    tokens = out.sequences[:, input_ids.shape[1]:].numpy()
    return (tokens, torch.stack(out.scores, 1).numpy()) if scores else tokens


def assert_same_greedy_tokens(ours, expected, scores, tie=1e-4):
    """`ours` equal to transformers' greedy tokens `expected`, except after a tie it could not break
    the same way: where a row first differs, the reference's two best scores must lie within `tie`
    of each other (relative to the row's largest score; our logits are ~1e-6 from theirs) and ours
    must be the other of the two. That row is not compared further: the two continuations differ.
    On the suite's random models 0.4% of greedy choices have their best two within 1e-3 (of 1,152
    measured), so about 4 in 10,000 within `tie`; the closest was 1.5e-4."""
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    for row in range(expected.shape[0]):
        differ = np.flatnonzero(ours[row] != expected[row])
        if differ.size == 0:
            continue
        step = differ[0]
        step_scores = scores[row, step]
        second, best = np.sort(step_scores)[-2:]
        scale = np.abs(step_scores[np.isfinite(step_scores)]).max()
        tied = best - second <= tie * scale and step_scores[ours[row, step]] >= second
        assert tied, (f"row {row} differs at new token {step}: ours {ours[row, step]} (score "
                      f"{step_scores[ours[row, step]]:.6g}), transformers {expected[row, step]} (score {best:.6g}, "
                      f"runner-up {second:.6g}); ours {ours[row].tolist()}, theirs {expected[row].tolist()}")
