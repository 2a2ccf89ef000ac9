"""Command line: serve a checkpoint over HTTP with OpenAI's chat-completions interface.

    python -m idefics_jax.serve --checkpoint DIR --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
        {"type": "text", "text": "What is written here?"}]}], "max_tokens": 32}'

DIR is a Hugging Face Idefics2 directory, an idefics_jax checkpoint or a training workdir (local or
gs://). Up to --max_batch requests decode together, whatever their settings; a request joins the
running batch as soon as a row is free and leaves when it is answered (continuous batching; see
idefics_jax/inference/server.py for the request fields). One process (on several devices of its
host with --mesh); stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import jax

from idefics_jax.cli.common import USER_ERRORS, add_device_arguments, open_assistant, start
from idefics_jax.data.image_processing import MAX_IMAGE_PIXELS
from idefics_jax.inference.server import Server


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idefics_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face directory, idefics_jax checkpoint or workdir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=8, help="most requests decoding together (rows of the batch)")
    p.add_argument("--batch_window", type=float, default=0.01,
                   help="seconds an idle server waits after a request for others to start with it")
    p.add_argument("--max_columns", type=int, default=None,
                   help="longest request, prompt + max_tokens (default: the model's context); the KV cache "
                        "holds max_batch x min(sliding window, max_columns) columns")
    p.add_argument("--decode_chunk", type=int, default=1,
                   help="tokens each row decodes per device call (fewer host round trips; requests join, leave "
                        "and stream text between calls)")
    p.add_argument("--max_queue", type=int, default=None,
                   help="requests taken beyond the --max_batch decoding, waiting for a row (default 4 x max_batch)")
    p.add_argument("--queue_timeout", type=float, default=10.0,
                   help="seconds a request waits for a place when the queue is full, before a 503 with Retry-After")
    p.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="the most pixels an image of a request may have (refused from its header, with a 400)")
    p.add_argument("--model_name", default=None, help="the model id that /v1/models lists (default: the "
                   "checkpoint's model type, idefics2, idefics3 or smolvlm)")
    p.add_argument("--tokenizer", help="a sentencepiece .model or a tokenizer.json (default: the checkpoint's)")
    add_device_arguments(p)
    return p


def make_server(args):
    """The `Server` that `args` describe (the checkpoint loaded, not yet serving)."""
    mesh = start(args)
    if jax.process_count() > 1:
        raise ValueError("serve runs in one process (several devices of one host with --mesh)")
    if (args.max_batch < 1 or args.batch_window < 0 or (args.max_columns is not None and args.max_columns < 2)
            or args.decode_chunk < 1):
        raise ValueError(f"--max_batch must be >= 1, --batch_window >= 0, --max_columns >= 2 and --decode_chunk >= 1, "
                         f"got {args.max_batch}, {args.batch_window}, {args.max_columns}, {args.decode_chunk}")
    if (args.max_queue is not None and args.max_queue < 0) or args.queue_timeout < 0 or args.max_image_pixels < 1:
        raise ValueError(f"--max_queue and --queue_timeout must be >= 0 and --max_image_pixels >= 1, got "
                         f"{args.max_queue}, {args.queue_timeout}, {args.max_image_pixels}")
    return Server(open_assistant(args, mesh), args.host, args.port, model_name=args.model_name, max_batch=args.max_batch,
                  batch_window=args.batch_window, max_columns=args.max_columns, decode_chunk=args.decode_chunk,
                  max_queue=args.max_queue, queue_timeout=args.queue_timeout, max_image_pixels=args.max_image_pixels)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        server = make_server(args)
    except USER_ERRORS + (OSError,) as error:  # OSError: the address cannot be bound
        print(f"error: {error}", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler stopping the service) ends it as Ctrl-C does: no new requests, and the
    # worker finishes the requests it has taken
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"Serving {args.checkpoint} at {server.url}/v1/chat/completions", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        server.worker.join(timeout=60)
    print("Stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
