"""Chat turns: time to first token when the KV cache is kept between turns, against prefilling the
whole conversation again (ours without the kept cache, and transformers' `generate`), on this CPU.

    python benchmarks/chat.py [--repeats 3] [--configs tiny,80M] [--out benchmarks/RESULTS.md]

A four-turn conversation, batch 1, greedy, float32: turn 1 is 16 text tokens, an image, 16 text
tokens; turn 2 adds 24 text tokens; turn 3 another image and 16 text tokens; turn 4 24 text tokens.
Each turn's answer (16 tokens) goes into the next turn. Per turn, the time to the first new token:
`Conversation.stream` (prefills what the cache does not hold: the answer's last token and the new
turn), `Generator.stream` on the whole conversation (what the chat did before), and transformers'
`generate(max_new_tokens=1)` on the whole conversation. Compile time is excluded (a warm-up pass
over all turns first); medians of the repeats. The first tokens of all three are compared.
"""

from __future__ import annotations

import argparse
import datetime
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
    from transformers import Idefics2ForConditionalGeneration

    from idefics_jax import Idefics2, load_hf_checkpoint
    from idefics_jax.inference.conversation import Conversation
    from idefics_jax.inference.generate import Generator
    from train_step import CONFIGS, save_random_model

    lines = [f"\n## Chat turns: time to first token with the KV cache kept ({datetime.date.today()})\n",
             f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads).\n",
             f"Command: `python benchmarks/chat.py --repeats {args.repeats} {malloc}` (float32, greedy, batch 1, same converted "
             f"weights; four turns, each answer {ANSWER} tokens long and part of the next turn; median of the repeats "
             "after a warm-up pass; ours kept = `Conversation.stream`, ours whole = `Generator.stream` on the whole "
             "conversation, transformers = `generate` on the whole conversation).\n",
             "| config | turn | conversation tokens | prefilled by ours kept | transformers (ms) | ours whole (ms) | "
             "ours kept (ms) | kept vs transformers | kept vs whole | same first token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
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

        kept_times, whole_times, torch_times = [[] for _ in TURNS], [[] for _ in TURNS], [[] for _ in TURNS]
        firsts, prefilled, lengths = [], [], []
        for repeat in range(args.repeats + 1):  # the first pass compiles
            conversation = Conversation(generator, image_token_id=config.image_token_id,
                                        image_seq_len=config.image_seq_len)
            ids, images = [], []
            for t, (tokens, new_images) in enumerate(new_turns):
                ids, images = ids + tokens, images + new_images
                kept, answer = first_token_time(conversation.stream(ids, images, max_new_tokens=ANSWER))
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
                else:
                    firsts.append((answer[0], whole_tokens[0], theirs))
                    prefilled.append(len(ids) - conversation.reused)
                    lengths.append(len(ids))
                ids = ids + answer
        for t in range(len(TURNS)):
            k, wh, th = (statistics.median(x[t]) for x in (kept_times, whole_times, torch_times))
            same = len(set(firsts[t])) == 1
            lines.append(f"| {name} | {t + 1} | {lengths[t]} | {prefilled[t]} | {th * 1e3:.1f} | {wh * 1e3:.1f} | "
                         f"{k * 1e3:.1f} | {th / k:.1f}x | {wh / k:.1f}x | {same} |")
            print(lines[-1], flush=True)
    append_results(args.out, lines)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
