"""Chat turns: time to first token when the KV cache is kept between turns, against prefilling the
whole conversation again (ours without the kept cache, and transformers' `generate`), on this CPU.

    python benchmarks/chat.py [--repeats 3] [--configs tiny,80M] [--out benchmarks/RESULTS.md]

A four-turn conversation, batch 1, greedy, float32: turn 1 is 16 text tokens, an image, 16 text
tokens; turn 2 adds 24 text tokens; turn 3 another image and 16 text tokens; turn 4 24 text tokens.
Each turn's answer (16 tokens) goes into the next turn. Per turn, the time to the first new token, like for like: with the KV cache kept between turns,
`Conversation.stream` against transformers' model called on what its kept cache (`DynamicCache`)
does not hold (the answer's last token and the new turn, with the new turn's images), the answer
then added to its cache untimed, as `generate` would have; and the whole conversation encoded
again, `Generator.stream` against transformers' `generate(max_new_tokens=1)`. Compile time is
excluded (a warm-up pass over all turns first); medians of the repeats. The first tokens of all
four are compared.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import numpy as np

ANSWER = 16
TURNS = [(16, True, 16), (24, False, 0), (0, True, 16), (24, False, 0)]  # text, an image, text


def turn_tokens(spec, rng, image_seq_len, before, image, after):
    image_id = spec["image_token_id"]
    text = lambda n: rng.integers(3, image_id - 1, n).tolist()
    return text(before) + ([image_id] * image_seq_len if image else []) + text(after)


def first_token_time(stream):
    start = time.perf_counter()
    token = int(np.asarray(next(stream)).reshape(-1)[0])
    elapsed = time.perf_counter() - start
    rest = [int(np.asarray(t).reshape(-1)[0]) for t in stream]
    return elapsed, [token] + rest


def torch_kept_first(model, cache, tokens, images, total):
    """transformers with its cache kept: `tokens` (what `cache` does not hold) and their images
    prefilled onto `cache`; (seconds to the first new token, the token)."""
    import torch

    kwargs = dict(input_ids=torch.tensor([tokens]), attention_mask=torch.ones((1, total), dtype=torch.long),
                  cache=cache, use_cache=True)
    if images:
        pixels = np.stack(images)[None]
        kwargs.update(pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3),
                      pixel_attention_mask=torch.ones(pixels.shape[:-1], dtype=torch.bool))
    start = time.perf_counter()
    with torch.no_grad():
        token = int(model(**kwargs).logits[0, -1].argmax())
    return time.perf_counter() - start, token


def torch_kept_extend(model, cache, tokens, total):
    """Adds `tokens` (an answer but its last token) to the kept cache, as `generate` would have."""
    import torch

    if tokens:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens]), attention_mask=torch.ones((1, total), dtype=torch.long),
                  cache=cache, use_cache=True)


def main():
    from preprocess import add_malloc_option, append_results, apply_malloc, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="tiny,80M")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    add_malloc_option(parser, "default")  # as our command line does
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)  # before torch or XLA start their threads
    import torch
    from transformers import DynamicCache, Idefics2ForConditionalGeneration

    torch.set_num_threads(os.cpu_count())  # both frameworks on every core (XLA:CPU takes them all)

    from idefics_jax import Idefics2, load_hf_checkpoint
    from idefics_jax.inference.conversation import Conversation
    from idefics_jax.inference.generate import Generator
    from train_step import CONFIGS, save_random_model

    lines = [f"\n## Chat turns: time to first token with the KV cache kept ({datetime.date.today()})\n",
             f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), XLA:CPU on "
             f"{os.cpu_count()} cores.\n",
             f"Command: `python benchmarks/chat.py --repeats {args.repeats} {malloc}` (float32, greedy, batch 1, same converted "
             f"weights; four turns, each answer {ANSWER} tokens long and part of the next turn; median of the repeats "
             "after a warm-up pass. Kept: both keep their KV cache between turns and prefill only what it does not "
             "hold (ours `Conversation.stream`, transformers' model on its `DynamicCache`); whole: both encode the "
             "whole conversation again (ours `Generator.stream`, transformers `generate`)).\n",
             "| config | turn | conversation tokens | prefilled when kept | kept: transformers (ms) | kept: ours (ms) "
             "| kept: speed-up | whole: transformers (ms) | whole: ours (ms) | whole: speed-up | same first token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        hf_dir, _ = save_random_model(name)
        config, params = load_hf_checkpoint(hf_dir)
        generator = Generator(Idefics2(config), params)
        hf_model = Idefics2ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
        rng = np.random.default_rng(0)
        h, w = spec["image"]
        image = lambda: rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
        new_turns = [(turn_tokens(spec, rng, config.image_seq_len, *t), [image()] if t[1] else []) for t in TURNS]

        kept_times, whole_times, torch_times, torch_kept_times = ([[] for _ in TURNS] for _ in range(4))
        firsts, prefilled, lengths = [], [], []
        for repeat in range(args.repeats + 1):  # the first pass compiles
            conversation = Conversation(generator, image_token_id=config.image_token_id,
                                        image_seq_len=config.image_seq_len)
            cache, cached = DynamicCache(config=hf_model.config.text_config), 0  # transformers' kept cache
            ids, images = [], []
            for t, (tokens, new_images) in enumerate(new_turns):
                ids, images = ids + tokens, images + new_images
                kept, answer = first_token_time(conversation.stream(ids, images, max_new_tokens=ANSWER))
                theirs_kept, theirs_kept_token = torch_kept_first(hf_model, cache, ids[cached:], new_images, len(ids))
                pixels = np.stack(images)[None] if images else None
                pixel_mask = np.ones(pixels.shape[:-1], bool) if images else None
                whole, whole_tokens = first_token_time(generator.stream(
                    np.asarray([ids]), np.ones((1, len(ids)), np.int32), pixels, pixel_mask, max_new_tokens=1))
                kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                              do_sample=False, max_new_tokens=1, eos_token_id=None, pad_token_id=0)
                if images:
                    kwargs.update(pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3),
                                  pixel_attention_mask=torch.tensor(pixel_mask))
                start = time.perf_counter()
                with torch.no_grad():
                    theirs = int(hf_model.generate(**kwargs)[0, -1])
                theirs_time = time.perf_counter() - start
                if repeat:
                    kept_times[t].append(kept), whole_times[t].append(whole), torch_times[t].append(theirs_time)
                    torch_kept_times[t].append(theirs_kept)
                else:
                    firsts.append((answer[0], whole_tokens[0], theirs, theirs_kept_token))
                    prefilled.append(len(ids) - conversation.reused)
                    lengths.append(len(ids))
                torch_kept_extend(hf_model, cache, answer[:-1], len(ids) + len(answer) - 1)  # as its generate would
                cached = len(ids) + len(answer) - 1
                ids = ids + answer
        for t in range(len(TURNS)):
            k, wh, th, tk = (statistics.median(x[t]) for x in (kept_times, whole_times, torch_times, torch_kept_times))
            same = len(set(firsts[t])) == 1
            lines.append(f"| {name} | {t + 1} | {lengths[t]} | {prefilled[t]} | {tk * 1e3:.1f} | {k * 1e3:.1f} | "
                         f"{tk / k:.2f}x | {th * 1e3:.1f} | {wh * 1e3:.1f} | {th / wh:.2f}x | {same} |")
            print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
