"""The HTTP server (OpenAI's chat-completions interface) on a tiny random model with a real tokenizer:
concurrent requests batched and answered as each alone, streaming, and clear errors."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from helpers.server_requests import image_part, request
from idefics_jax.inference.sampling import Sampling
from idefics_jax.cli.serve import main, make_server, parser


@pytest.fixture(scope="module")
def server(chat_dir):  # noqa: F811
    args = parser().parse_args(["--checkpoint", str(chat_dir[0]), "--port", "0", "--max_batch", "4",
                                "--batch_window", "1.0", "--decode_chunk", "2"])
    server = make_server(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.close()


def test_concurrent_requests_decode_together_and_answer_as_each_alone(server, chat_dir):  # noqa: F811
    """Five requests at once on four rows (greedy, sampled, streamed; one waits for a free row), two
    tokens per device call (a budget of 3 ends inside a call): each answer is `Assistant.reply`'s for
    that request alone."""
    path = chat_dir[0]
    conversations = [
        [{"role": "user", "content": [image_part(path / "a.png"), {"type": "text", "text": "What is this?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Say more about"}, image_part(path / "a.png")]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Compare "}, image_part(path / "a.png"),
                                      {"type": "text", "text": " and "}, image_part(path / "b.png")]}],
    ]
    as_ours = [  # the same conversations as Assistant.reply takes them (the first two: one compiled program)
        ([{"role": "user", "content": "<image>What is this?"}], ["a.png"]),
        ([{"role": "user", "content": "Say more about<image>"}], ["a.png"]),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare <image> and <image>"}],
         ["a.png", "b.png"]),
    ]
    budgets = [5, 3, 6]  # with two tokens per call, 5 and 3 end inside a call
    sampled = {"temperature": 0.8, "top_k": 20, "seed": 7}
    bodies = [{"model": "idefics2", "messages": c, "max_tokens": n} for c, n in zip(conversations, budgets)]
    bodies.append({"messages": conversations[0], "max_tokens": 6, **sampled})
    bodies.append({"messages": conversations[0], "max_tokens": budgets[0], "stream": True})
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: request(server.url + "/v1/chat/completions", body), bodies))
    assert max(server.worker.busy_rows) == 4 and not server.worker.running  # 4 rows: one request waited
    assistant = server.worker.assistant
    status, events = replies.pop()
    expected = assistant.reply(as_ours[0][0], [Image.open(path / "a.png")], max_new_tokens=6, seed=7,
                               sampling=Sampling(temperature=0.8, top_k=20))
    assert replies.pop()[1]["choices"][0]["message"]["content"] == expected
    for (status, reply), (messages, images), budget in zip(replies, as_ours, budgets):
        assert status == 200, reply
        expected = assistant.reply(messages, [Image.open(path / i) for i in images], max_new_tokens=budget)
        choice = reply["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected}
        used = reply["usage"]["completion_tokens"]
        assert 1 <= used <= budget and choice["finish_reason"] == ("length" if used == budget else "stop") or (
            used == budget and choice["finish_reason"] == "stop")
        assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + used
        assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")

    # the streamed one: server-sent events whose pieces join into the first one's answer
    assert status == 200 and events.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == replies[0][1]["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == replies[0][1]["choices"][0]["finish_reason"]


def test_bad_requests_are_named_and_the_server_goes_on(server, chat_dir):  # noqa: F811
    url = server.url + "/v1/chat/completions"
    user = lambda content: {"messages": [{"role": "user", "content": content}]}
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    cases = [
        (user([{"type": "image_url", "image_url": {"url": garbage}}]),
         "messages[0].content[0]: the image cannot be read"),
        (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), "cannot be read"),
        (user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]), "inline as data URLs"),
        (user("<image>What is this?"), "the text holds <image>"),
        ({**user("Hi"), "n": 2}, "'n' is not supported"),
        ({**user("Hi"), "max_tokens": 0}, "max_tokens must be at least 1"),
        ({**user("Hi"), "temperature": -1}, "temperature must be >= 0"),
        ({**user("Hi"), "max_tokens": 100_000}, "new ones were asked for"),  # longer than the context
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "The last message must be the user's"),
        ({"messages": []}, "'messages' must be a non-empty list"),
    ]
    for body, message in cases:
        status, reply = request(url, body)
        assert status == 400 and message in reply["error"]["message"], (body, reply)
    assert request(url, raw=b"{not json")[0] == 400
    assert request(server.url + "/v1/completions", {})[0] == 404
    assert request(server.url + "/health") == (200, {"status": "ok"})
    assert request(server.url + "/v1/models")[1]["data"][0]["id"] == "idefics2"
    status, reply = request(url, {**user("Hello"), "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2


def test_a_failed_step_fails_its_requests_and_the_next_batch_starts_afresh(server, monkeypatch):
    batcher = server.worker.batcher
    advance = batcher.advance

    def fails_once(n):
        monkeypatch.setattr(batcher, "advance", advance)
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")

    monkeypatch.setattr(batcher, "advance", fails_once)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    status, reply = request(server.url + "/v1/chat/completions", body)
    assert status == 500 and "RuntimeError: RESOURCE_EXHAUSTED" in reply["error"]["message"], reply
    assert batcher.free == batcher.rows and not server.worker.running
    status, reply = request(server.url + "/v1/chat/completions", body)
    assert status == 200 and 1 <= reply["usage"]["completion_tokens"] <= 3, reply


def test_the_command_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert f"Checkpoint directory {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


def test_the_command_serves_until_sigterm(chat_dir):  # noqa: F811
    """The command line as a service manager runs it: it serves, then stops on SIGTERM with status 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "idefics_jax.serve", "--checkpoint", str(chat_dir[0]), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if found := re.search(r"Serving .* at (http://\S+)/v1/chat/completions", line):
                break
        assert found, "the command did not start serving"
        assert request(found.group(1) + "/health") == (200, {"status": "ok"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0 and "Stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_earlier_answers_are_disarmed_and_typed_placeholders_refused():
    from idefics_jax.inference.server import RequestError, parse_request

    disarm = lambda text: text.replace("<image>", "<\u2060image>")  # as Tokenizer.disarm does
    job = parse_request({"messages": [{"role": "assistant", "content": [{"type": "text", "text": "I said <image>"}]},
                                      {"role": "user", "content": "Why?"}], "max_tokens": 5}, disarm=disarm)
    assert job.messages == [{"role": "assistant", "content": "I said <\u2060image>"},
                            {"role": "user", "content": "Why?"}]
    assert job.max_tokens == 5 and job.images == [] and job.sampling.greedy
    with pytest.raises(RequestError, match=r"messages\[0\].content\[0\]: the text holds <image>"):
        parse_request({"messages": [{"role": "user", "content": "Say <image>"}]}, disarm=disarm)


def test_oversized_images_and_short_bodies_are_refused_with_a_400(server, chat_dir):  # noqa: F811
    import socket

    from helpers.inputs import png_header

    url = server.url + "/v1/chat/completions"
    for width, height in [(20000, 20000), (9000, 9000)]:  # beyond PIL's own limit; beyond the server's
        url_part = "data:image/png;base64," + base64.b64encode(png_header(width, height)).decode()
        status, reply = request(url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url_part}}, {"type": "text", "text": "What is this?"}]}]})
        assert status == 400 and "max_image_pixels" in reply["error"]["message"] or "too large" in \
            reply["error"]["message"], reply
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:  # 10 bytes of a promised 100
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.0 400") and "fewer than its Content-Length of 100" in answer, answer
    assert request(server.url + "/health") == (200, {"status": "ok"})


def test_a_burst_of_64_clients_is_answered_without_a_reset(chat_dir, tmp_path):  # noqa: F811
    """64 clients at once for 30 s (streamed and not, sampled and greedy, a third with an image) on a
    server with 4 rows and 8 queued places: every request gets a 200, or a 503 with Retry-After;
    none is reset; `/health` answers throughout; the server's resident memory after the burst, and
    after four requests at once with a 6000 x 6000 image each, is within 150 MB of what it held
    after a warm-up of the same requests (without handing freed memory back: +570 MB)."""
    import random
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "idefics_jax.serve", "--checkpoint", str(chat_dir[0]), "--port",
                             "0", "--max_batch", "4", "--max_queue", "8", "--queue_timeout", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    rss = lambda: next(int(line.split()[1]) * 1024 for line in open(f"/proc/{proc.pid}/status")
                       if line.startswith("VmRSS:"))
    try:
        for line in proc.stderr:
            if found := re.search(r"Serving .* at (http://\S+)/v1/chat/completions", line):
                break
        assert found, "the command did not start serving"
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep its log flowing
        base = found.group(1)
        image = image_part(chat_dir[0] / "a.png")

        def body(rng):
            content = [image, {"type": "text", "text": "What is this?"}] if rng.random() < 1 / 3 else "Hello there"
            return {"messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(1, 12),
                    "stream": rng.random() < 0.5, "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 99)}

        def call(rng):
            data = json.dumps(body(rng)).encode()
            try:
                with urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", data=data),
                                            timeout=120) as response:
                    response.read()
                    return response.status, None
            except urllib.error.HTTPError as e:
                e.read()
                return e.code, e.headers.get("Retry-After")
            except (urllib.error.URLError, ConnectionError) as e:
                return "failed", repr(e)

        large = tmp_path / "large.png"  # 6000 x 6000: 108 MB decoded, a few hundred KB sent
        Image.new("RGB", (6000, 6000), (200, 30, 90)).save(large)
        large_body = json.dumps({"messages": [{"role": "user", "content": [
            image_part(large), {"type": "text", "text": "What is this?"}]}], "max_tokens": 2}).encode()
        large_call = lambda _: urllib.request.urlopen(urllib.request.Request(
            base + "/v1/chat/completions", data=large_body), timeout=300).status
        for seed in range(6):  # warm-up: every kind of request compiled and its buffers allocated
            assert call(random.Random(seed))[0] == 200
        assert large_call(0) == 200
        before = rss()
        deadline = time.monotonic() + 30
        outcomes, health = [], []

        def client(k):
            rng = random.Random(k)
            while time.monotonic() < deadline:
                outcomes.append(call(rng))

        def poll_health():
            while time.monotonic() < deadline:
                began = time.monotonic()
                health.append((request(base + "/health")[0], time.monotonic() - began))
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(64)] + [threading.Thread(target=poll_health)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        after = rss()
        failed = [o for o in outcomes if o[0] not in (200, 503)]
        assert not failed, failed[:5]
        assert all(retry for status, retry in outcomes if status == 503), "every 503 says when to retry"
        assert sum(status == 200 for status, _ in outcomes) >= 64, Counter(s for s, _ in outcomes)
        assert len(health) >= 30 and all(status == 200 and seconds < 5 for status, seconds in health), health
        assert after - before < 150 * 2**20, f"resident memory {before / 2**20:.0f} -> {after / 2**20:.0f} MB"
        # four requests at once with a 6000 x 6000 image each (108 MB decoded): answered, and their
        # memory handed back
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(large_call, range(4)))
        assert statuses == [200] * 4
        time.sleep(1)
        last = rss()
        assert last - before < 150 * 2**20, f"resident memory {before / 2**20:.0f} -> {last / 2**20:.0f} MB"
        print(f"{len(outcomes)} requests: {Counter(s for s, _ in outcomes)}; RSS {before / 2**20:.0f} -> "
              f"{after / 2**20:.0f} MB, after large images {last / 2**20:.0f} MB")
    finally:
        proc.kill()
