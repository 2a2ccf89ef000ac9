"""An HTTP server with OpenAI's chat-completions interface that batches concurrent requests.

    server = Server(Assistant(load("DIR")), port=8000)
    server.serve_forever()            # python -m idefics_jax.serve --checkpoint DIR --port 8000

Endpoints: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`. A request is OpenAI's:
`messages` whose `content` is a string or a list of parts (`{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`: each image goes where
its part is), `max_tokens` (or `max_completion_tokens`, default 256), `temperature` (default 0:
greedy, as our command line), `top_p`, `seed`, `stream`; and ours: `top_k`, `min_p`,
`repetition_penalty`, `split` (true: Idefics2 images as 4 crops + the whole, Idefics3 / SmolVLM
images as a grid of tiles; false: each image whole; absent: as the checkpoint says). Images come inline as
`data:` URLs (the server reads no files and fetches nothing). A request the server cannot answer
as asked (malformed, an unreadable image, a prompt longer than the context, `n` > 1, `stop`,
`logprobs`, tools) gets status 400 and an error naming the problem; the server goes on. An image
of more than `max_image_pixels` pixels is refused from its header (400 naming the limit), and
memory freed after a request with images is handed back to the kernel.

The server holds a burst of clients: connections wait in a listen backlog of `BACKLOG`, and at most
`max_batch + max_queue` requests are taken at once (decoding, or queued for a free row); one more
waits up to `queue_timeout` seconds for a place, then gets `503` with `Retry-After` (never a reset
connection). A client that sends less than its Content-Length, or nothing for `READ_TIMEOUT`
seconds, gets a `400` or is closed; connection errors are logged on one line.

Requests are batched continuously (`Batcher`): up to `max_batch` of them decode together, each
with its own settings (greedy or sampled, streamed or not, split or not), and a request joins the
running batch as soon as a row is free: its prompt is prefilled, then it decodes with the others,
and it leaves at its stop token or `max_tokens`. Each answer is the one the request gets alone
(`Assistant.reply` with its seed). One worker thread owns the model and admits requests in
arrival order; an idle worker waits `batch_window` seconds after a request for others to start with
it. `max_columns` bounds a request's prompt + `max_tokens` (the cache's columns per row; by
default the model's context).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.server
import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

from idefics_jax import host_memory
from idefics_jax.data.image_processing import MAX_IMAGE_PIXELS, ImageError, load_image
from idefics_jax.data.image_tokens import IMAGE_TOKEN
from idefics_jax.inference.assistant import TextPieces
from idefics_jax.inference.batcher import Batcher
from idefics_jax.inference.sampling import Sampling

log = logging.getLogger(__name__)

UNSUPPORTED = {"n": 1, "stop": None, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
               "response_format": None, "functions": None, "logit_bias": None}


MAX_BODY = 256 << 20  # bytes of one request (its images inline)
BACKLOG = 1024  # connections the kernel holds before the server accepts them (Python's default: 5)
READ_TIMEOUT = 60  # seconds a connection may stay silent while its request is read


class RequestError(ValueError):
    """A request that cannot be answered as asked (HTTP 400)."""


@dataclasses.dataclass
class Job:
    messages: list[dict]
    images: list
    max_tokens: int = 256
    sampling: Sampling = Sampling()
    seed: int = 0
    split: bool | None = None  # None: as the checkpoint's image-processing settings say
    stream: bool = False
    result: dict | None = None
    error: Exception | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    pieces: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # streamed text; None ends it
    cancelled: bool = False  # the client went away


def decode_image(url: str, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS):
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RequestError(f"{where}: images are sent inline as data URLs (data:image/png;base64,...), got "
                           f"{str(url)[:60]!r}")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        return load_image(data, max_pixels)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the image cannot be read ({e})") from None


def parse_content(content, where: str, disarm=None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[str, list]:
    """A message's content -> (text with `<image>` where each image part was, the images).
    `disarm`: for model-written text (earlier answers), breaks the special tokens it spells
    (`Tokenizer.disarm`) instead of refusing a typed `<image>`. `max_pixels`: the largest image taken."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise RequestError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    text, images = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if disarm is None and IMAGE_TOKEN in part["text"]:
                raise RequestError(f"{where}.content[{i}]: the text holds {IMAGE_TOKEN}; send images as "
                                   "image_url parts")
            text.append(part["text"] if disarm is None else disarm(part["text"]))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, f"{where}.content[{i}]", max_pixels))
            text.append(IMAGE_TOKEN)
        else:
            raise RequestError(f"{where}.content[{i}]: a part is {{'type': 'text', 'text': ...}} or "
                               f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}, got {str(part)[:80]}")
    return "".join(text), images


def parse_request(body: Any, disarm=None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Job:
    """A chat-completions request (decoded JSON) -> a Job; `RequestError` naming what is wrong.
    `disarm`: applied to the assistant's earlier answers (see `parse_content`); `max_pixels`: the
    largest image taken."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object")
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None):
            raise RequestError(f"'{key}' is not supported by this server (got {body[key]!r})")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    turns, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with a role of system, user or assistant")
        text, found = parse_content(message.get("content"), f"messages[{i}]",
                                    disarm if message["role"] == "assistant" else None, max_pixels)
        if found and message["role"] != "user":
            raise RequestError(f"messages[{i}]: only user messages carry images")
        turns.append({"role": message["role"], "content": text})
        images.extend(found)
    if turns[-1]["role"] != "user":
        raise RequestError("The last message must be the user's")
    number = lambda key, default, kind: _number(body, key, default, kind)
    try:
        sampling = Sampling(temperature=number("temperature", 0.0, float), top_k=number("top_k", 0, int),
                            top_p=number("top_p", 1.0, float), min_p=number("min_p", 0.0, float),
                            repetition_penalty=number("repetition_penalty", 1.0, float))
    except ValueError as e:
        raise RequestError(str(e)) from None
    max_tokens = number("max_completion_tokens", None, int)
    max_tokens = number("max_tokens", 256, int) if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
    return Job(turns, images, max_tokens=max_tokens, sampling=sampling, seed=number("seed", 0, int),
               split=None if body.get("split") is None else bool(body["split"]), stream=bool(body.get("stream", False)))


def _number(body: dict, key: str, default, kind):
    value = body.get(key, default)
    if value is None or value is default:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    return kind(value)


@dataclasses.dataclass
class Running:
    """A job in a row of the batch: its tokens so far, its streamed text."""

    job: Job
    prompt_tokens: int
    pieces: TextPieces | None  # streamed jobs only
    tokens: list[int] = dataclasses.field(default_factory=list)


class Worker(threading.Thread):
    """Owns the model: admits jobs into free rows of a running batch (`Batcher`) as they arrive and
    steps it while any row is busy; a job leaves at its stop token or `max_tokens`."""

    def __init__(self, assistant, *, max_batch: int = 8, batch_window: float = 0.01, max_columns: int | None = None,
                 decode_chunk: int = 1):
        super().__init__(name="idefics-serve-worker", daemon=True)
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
        self.assistant = assistant
        self.batch_window = batch_window
        self.decode_chunk = decode_chunk  # tokens per device call; jobs join and leave between calls
        self.batcher = Batcher(assistant.generator, rows=max_batch, max_columns=max_columns)
        self.jobs: queue.Queue = queue.Queue()
        self.running: dict[int, Running] = {}  # row -> its job
        self.busy_rows: Counter = Counter()  # decode calls run with each number of busy rows (logs, tests)

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def stop(self):
        """Stops after the jobs submitted so far."""
        self.jobs.put(None)

    def run(self):
        stopping = False
        while not (stopping and not self.running):
            if not self.running:  # idle: wait for a job, then briefly for others that come with it
                job = self.jobs.get()
                if job is None:
                    break
                self._admit(job)
                deadline = time.monotonic() + self.batch_window
                while self.batcher.free and (left := deadline - time.monotonic()) > 0:
                    try:
                        job = self.jobs.get(timeout=left)
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    self._admit(job)
            while self.batcher.free and not stopping:  # what came while the batch ran joins it
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    self._admit(job)
            if self.running:
                self._step()

    def _admit(self, job: Job):
        a = self.assistant
        try:
            inputs = a.prepare([job.messages], [job.images], split=job.split)
            row = self.batcher.admit(*a._inputs(inputs), max_new_tokens=job.max_tokens, sampling=job.sampling,
                                     seed=job.seed)
        except ValueError as e:  # this request's problem (too long, ...): the batch goes on
            self._finish(job, error=RequestError(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - a failed program may have consumed the batch
            self._failed(e, job)
            return
        self.running[row] = Running(job, int(inputs["attention_mask"].sum()), TextPieces(a) if job.stream else None)

    def _step(self):
        try:
            tokens = self.batcher.advance(self.decode_chunk)
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return
        self.busy_rows[len(self.running)] += 1
        for row, run in list(self.running.items()):
            job = run.job
            for token in map(int, tokens[row]):
                stopped = token in self.assistant.stop_ids
                if not stopped and not job.cancelled:
                    run.tokens.append(token)
                    if run.pieces is not None and (piece := run.pieces.add(token)):
                        job.pieces.put(piece)
                if stopped or job.cancelled or len(run.tokens) == job.max_tokens:
                    del self.running[row]
                    self.batcher.release(row)
                    if run.pieces is not None and not job.cancelled and (piece := run.pieces.end()):
                        job.pieces.put(piece)
                    self._finish(job, result=self._answer(run.tokens, stopped, run.prompt_tokens))
                    break  # its later tokens decoded past its end

    def _failed(self, error: Exception, job: Job | None = None):
        """A program failed: the batch starts afresh, then every running job (and `job`) gets the error."""
        log.error("generation failed", exc_info=error)
        failed = [run.job for run in self.running.values()] + ([job] if job is not None else [])
        self.running.clear()
        try:
            self.batcher.reset()
        except Exception:  # noqa: BLE001 - out of memory still: the next request tries again (and gets a 500)
            log.exception("the batch could not be started afresh")
        for job in failed:
            self._finish(job, error=error)

    @staticmethod
    def _finish(job: Job, result: dict | None = None, error: Exception | None = None):
        job.result, job.error = result, error
        job.pieces.put(None)
        job.done.set()

    def _answer(self, tokens: list[int], stopped: bool, prompt_tokens: int) -> dict:
        used = len(tokens) + stopped  # the stop token counts, as OpenAI counts it
        return {"text": self.assistant.decode(tokens), "finish_reason": "stop" if stopped else "length",
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                          "total_tokens": prompt_tokens + used}}


class Server(http.server.ThreadingHTTPServer):
    """`Server(assistant, host, port)`; `serve_forever()` in any thread, `close()` to stop.

    max_queue: requests taken beyond the `max_batch` decoding (default 4 x max_batch); queue_timeout:
    seconds one more waits for a place before its 503; max_image_pixels: the largest image taken."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, assistant, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
                 max_batch: int = 8, batch_window: float = 0.01, max_columns: int | None = None,
                 decode_chunk: int = 1, max_queue: int | None = None, queue_timeout: float = 10.0,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        self.model_name = model_name or assistant.loaded.config.model_type  # idefics2, idefics3 or smolvlm
        self.max_image_pixels = max_image_pixels
        self.queue_timeout = queue_timeout
        self.places = threading.BoundedSemaphore(max_batch + (4 * max_batch if max_queue is None else max_queue))
        self.worker = Worker(assistant, max_batch=max_batch, batch_window=batch_window, max_columns=max_columns,
                             decode_chunk=decode_chunk)
        self.worker.start()
        super().__init__((host, port), Handler)

    def handle_error(self, request, client_address):
        """One line for a connection that failed (socketserver prints a traceback)."""
        error = sys.exc_info()[1]
        log.warning("%s: the connection failed (%s: %s)", client_address[0], type(error).__name__, error)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self):
        self.shutdown()
        self.server_close()
        self.worker.stop()


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    timeout = READ_TIMEOUT  # on the connection's socket: a silent client does not hold a thread forever

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    def _json(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        self._json(status, {"error": {"message": message, "type": kind}}, headers)

    def do_GET(self):
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "idefics_jax"}]})
        else:
            self._error(404, f"No such endpoint: GET {self.path}", "not_found")

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self._error(404, f"No such endpoint: POST {self.path}", "not_found")
            return
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self._error(400, f"Content-Length {length!r} is not a number of bytes")
            return
        if (length := int(length)) > MAX_BODY:
            self._error(413, f"The request is {length} bytes; this server takes up to {MAX_BODY}")
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True  # nothing to answer: the client stopped sending
            return
        if len(body) < length:
            self._error(400, f"The request body has {len(body)} bytes, fewer than its Content-Length of {length}")
            return
        if not self.server.places.acquire(timeout=self.server.queue_timeout):
            retry = max(1, round(self.server.queue_timeout))
            self._error(503, f"The server is busy (every place taken for {self.server.queue_timeout:g} s); "
                             f"retry in {retry} s", "server_busy", {"Retry-After": str(retry)})
            return
        try:
            self._answer(body)
        finally:
            self.server.places.release()
            if b"image_url" in body:  # the request's decoded images are freed: give their memory back
                host_memory.release_freed_memory()

    def _answer(self, body: bytes):
        try:
            job = parse_request(json.loads(body or b"null"), disarm=self.server.worker.assistant.tokenizer.disarm,
                                max_pixels=self.server.max_image_pixels)
        except json.JSONDecodeError as e:
            self._error(400, f"The request body is not JSON: {e}")
            return
        except (RequestError, ImageError) as e:
            self._error(400, str(e))
            return
        self.server.worker.submit(job)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            self._stream(job, reply_id, created)
            return
        job.done.wait()
        if job.error is not None:
            self._failed(job.error)
            return
        self._json(200, {"id": reply_id, "object": "chat.completion", "created": created,
                         "model": self.server.model_name, "usage": job.result["usage"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": job.result["text"]},
                                      "finish_reason": job.result["finish_reason"]}]})

    def _failed(self, error: Exception):
        if isinstance(error, RequestError):
            self._error(400, str(error))
        else:
            self._error(500, f"Generation failed: {type(error).__name__}: {error}", "server_error")

    def _stream(self, job: Job, reply_id: str, created: int):
        """Server-sent events: a chunk per piece of text, the finish reason, then [DONE]."""
        first = job.pieces.get()
        if first is None and job.error is not None:  # failed before any text: a plain error answer
            job.done.wait()
            self._failed(job.error)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(delta: dict, finish: str | None = None, **extra):
            chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                     "model": self.server.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            piece = first
            while piece is not None:
                event({"content": piece})
                piece = job.pieces.get()
            job.done.wait()
            if job.error is not None:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(job.error)}})}\n\n".encode())
            else:
                event({}, job.result["finish_reason"], usage=job.result["usage"])
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True  # the worker stops generating at its next token
