"""Command line: answer about images with a checkpoint, streaming the answer; or chat.

    python -m idefics_jax.generate --checkpoint DIR --image photo.png --prompt "What is written here?"
    python -m idefics_jax.generate --checkpoint DIR --image a.png --image b.png --prompt "<image>vs<image>: which is larger?"
    python -m idefics_jax.generate --checkpoint DIR --image photo.png --chat      # a conversation on stdin

DIR is a Hugging Face Idefics2, Idefics3 or SmolVLM directory, an idefics_jax checkpoint or a
training workdir.
Without `<image>` placeholders the images go before the prompt's text. `--split` gives each
Idefics2 image 320 visual tokens (4 crops + the whole image) instead of 64, each Idefics3 / SmolVLM
image a grid of tiles (`--no-split`: one); by default as the checkpoint's image settings say. In
chat mode every line is a user turn; `/image PATH` attaches an image to the next turn, `/retry` answers the last turn again (a
new draw when sampling), `/reset` starts over, an empty line or end of input quits. Each turn
prefills only what is new (the KV cache is kept); when the conversation outgrows the model's
context, its oldest turns are dropped (a `--system` message stays).

On several hosts (a TPU pod, GPU hosts: `launch/gpu_multihost.sh` sets up `jax.distributed`), every
process runs the same command on the same files; the model is sharded over `--mesh` (by default
data parallel over the processes and tensor parallel over each one's devices) and process 0
prints. In chat mode process 0 reads the terminal and passes each line (and each `/image` file,
read on its host) to the other processes.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import jax

from idefics_jax.cli.common import USER_ERRORS, add_device_arguments, add_split_argument, open_assistant, start
from idefics_jax.data.image_processing import ImageError, load_image
from idefics_jax.data.image_tokens import IMAGE_TOKEN
from idefics_jax.distributed import FromLeader
from idefics_jax.inference.assistant import system_message
from idefics_jax.inference.sampling import Sampling


def user_turn(text: str, images: int) -> dict:
    """A user message; without placeholders, the images go first (as Idefics2's examples put them)."""
    placed = text.count(IMAGE_TOKEN)
    if placed and placed != images:
        raise ValueError(f"The prompt has {placed} {IMAGE_TOKEN} placeholder(s) but {images} image(s) were given")
    return {"role": "user", "content": text if placed else IMAGE_TOKEN * images + text}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idefics_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face directory, idefics_jax checkpoint or workdir")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", help="the question (required unless --chat)")
    p.add_argument("--chat", action="store_true", help="a conversation: user turns from stdin")
    p.add_argument("--system", help="a system message that opens the conversation (kept when old turns are dropped)")
    add_split_argument(p)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--min_p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one (0: off; 0.05-0.1 common)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="CTRL's penalty on the prompt's and answer's tokens, as transformers' (1.0: off; 1.2 is common)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a sentencepiece .model or a tokenizer.json (default: the checkpoint's)")
    add_device_arguments(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.chat and args.prompt is None:
        parser().error("--prompt is required (or use --chat)")
    try:
        mesh = start(args)
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, min_p=args.min_p)
        images = [load_image(path) for path in args.image]  # fail on a bad image before loading the model
        assistant = open_assistant(args, mesh)
        options = dict(split=args.split, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
        if not args.chat:
            out = sys.stdout if jax.process_index() == 0 else io.StringIO()  # every process generates; one prints
            messages = system_message(args.system) + [user_turn(args.prompt, len(images))]
            for piece in assistant.stream_reply(messages, images, **options):
                print(piece, end="", flush=True, file=out)
            print(file=out)
            return 0
        return chat(assistant, images, {**options, "system": args.system})
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def chat(assistant, images, options) -> int:
    """Each turn prefills only what is new: the conversation's KV cache is kept between turns.

    With several processes (jax.distributed, the model over every host's devices), process 0 reads
    stdin and prints. It passes each line, and each `/image` file's bytes, to the other processes
    (`FromLeader`), which take every turn with it."""
    leader, share = jax.process_index() == 0, FromLeader("chat")
    out, err = (sys.stdout, sys.stderr) if leader else (io.StringIO(), io.StringIO())
    conversation, pending = assistant.chat(**options), list(images)
    interactive = leader and sys.stdin.isatty()
    while True:
        if interactive:
            print("You: ", end="", flush=True)
        line = share(sys.stdin.readline().encode() if leader else None).decode()
        if not line or not line.strip():
            return 0
        line = line.strip()
        if line.startswith("/image "):
            path, data = line[len("/image "):].strip(), b""
            if leader:
                try:
                    data = Path(path).read_bytes()
                except OSError as error:  # a missing image loses nothing of the conversation
                    print(f"error: cannot read image {path}: {error.strerror or error}", file=err)
            data = share(data)
            if data:
                try:
                    pending.append(load_image(data))
                except ImageError as error:
                    print(f"error: {path}: {error}", file=err)
            continue
        if line == "/reset":
            conversation.reset()
            pending = []
            continue
        dropped = conversation.dropped
        try:
            if line == "/retry":
                pieces = conversation.retry()
            else:
                pieces = conversation.stream(user_turn(line, len(pending)), pending)
            first = next(pieces, "")  # a turn the model cannot take fails here, before any answer
        except ValueError as error:  # the conversation so far and the pending images stay
            print(f"error: {error}", file=err)
            continue
        print("Assistant: " + first, end="", flush=True, file=out)
        for piece in pieces:
            print(piece, end="", flush=True, file=out)
        print(flush=True, file=out)
        if line != "/retry":
            pending = []
        if conversation.dropped > dropped:
            print(f"(the {conversation.dropped - dropped} oldest message(s) no longer fit the model's context and "
                  f"were dropped)", file=err)


if __name__ == "__main__":
    sys.exit(main())
