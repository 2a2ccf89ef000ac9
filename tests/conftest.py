"""Shared fixtures: a tiny random Hugging Face Idefics2 (the reference) saved to disk.

Each test session draws fresh weights and fresh inputs; the seed is printed so a failure can be
reproduced with IDEFICS_TEST_SEED=<seed>.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from idefics_jax import host_memory
from idefics_jax.data.tokenizer import Tokenizer

# One persistent compilation cache for the session, its xdist workers and the commands it starts
# included (they inherit the variable): a command run twice, such as a killed training run and its
# resumption, compiles once. A fresh directory each session, removed at its end by the process that
# made it; the commands' own default (~/.cache/idefics_jax) is left alone.
OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # set but empty (scripts that compile afresh): off
if OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="idefics_jax_xla_")
COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]

# XLA:CPU's step buffers stay mapped between steps (idefics_jax.host_memory), here, in the xdist
# workers and in the commands the tests start (they inherit the variables)
if host_memory.reuse_freed_memory_on_cpu():
    os.environ.update(host_memory.ENVIRONMENT)

# XLA:CPU compiles the tests' programs without LLVM's optimisations: the tiny models spend most of
# their time compiling, which -O0 shortens (docs/correctness.md). Results differ from -O2's in
# rounding only; the tests compare programs compiled alike, or against torch within tolerances.
# Here, in the xdist workers and in the commands the tests start; `xla_flags(devices)` is the
# variable for a command on simulated devices.
# IDEFICS_TEST_OPTIMIZED=1 keeps XLA's default level (test_parity runs its tests so once).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("IDEFICS_TEST_OPTIMIZED") != "1":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a command the tests start: the fast compile above, and `devices` CPU devices."""
    return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)

IMAGE_TOKEN_ID = 100
HF_TINY = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=4),
    perceiver_config=dict(hidden_act="silu", resampler_n_latents=16, resampler_depth=2, resampler_n_heads=4,
                          resampler_head_dim=8, num_key_value_heads=2),
    text_config=dict(model_type="mistral", vocab_size=128, hidden_size=48, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                     max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0),
    image_token_id=IMAGE_TOKEN_ID,
)


SEED = int(os.environ.get("IDEFICS_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
os.environ["IDEFICS_TEST_SEED"] = str(SEED)  # the xdist workers, started after this, take the same seed


def pytest_report_header(config):
    return f"IDEFICS_TEST_SEED={SEED} (set it to rerun with the same random models and inputs)"


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)  # in case jax was imported first


def pytest_unconfigure(config):
    if OWN_CACHE:  # not in the xdist workers, which share the cache of the process that started them
        shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus not in (0, 5):  # shown with -q too, where the header is not
        terminalreporter.write_line(f"IDEFICS_TEST_SEED={SEED}")


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


def build_hf_model(seed: int, **overrides):
    """A random `Idefics2ForConditionalGeneration` in float32, eager attention, eval mode."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    kwargs = {**HF_TINY, **overrides}
    config = Idefics2Config(**kwargs)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    # Random init leaves norms at 1 and the latents at 1: perturb them so the test sees them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name or name.endswith("latents"):
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, seed):
    """A saved tiny reference model: (directory, model)."""
    path = tmp_path_factory.mktemp("hf_tiny")
    model = build_hf_model(seed)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def converted(hf_dir):
    """Our (config, params) loaded from the reference checkpoint."""
    from idefics_jax import load_hf_checkpoint

    return load_hf_checkpoint(hf_dir[0])


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def train_sentencepiece(seed: int, vocab_size: int = 400) -> bytes:
    """A tiny Mistral-style sentencepiece model (BPE, byte fallback) trained on made-up text."""
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    words = ("the a quick brown fox jumps over lazy dog what is written in this image answer user assistant "
             "hello world number one two three red green blue text photo page document caption").split()
    lines = [" ".join(rng.choice(words, size=rng.integers(2, 14))) + rng.choice([".", "?", "!", "", ":"])
             for _ in range(3000)]
    lines += ["".join(rng.choice(list("0123456789"), size=6)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2, num_threads=1)
    return model.getvalue()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, seed):
    """(tokenizer directory with tokenizer.model, model bytes)."""
    data = train_sentencepiece(seed)
    path = tmp_path_factory.mktemp("tokenizer")
    (path / "tokenizer.model").write_bytes(data)
    return path, data


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://idefics-test: a bucket in a Cloud Storage emulator served from this process (in memory).
    gcsfs (epath's gs:// backend), tensorstore (orbax's arrays) and array_record (the data's records)
    are pointed at it by their endpoint variables, set for the rest of the session (gcsfs reads its
    own at import, so nothing in this process may have imported it before), commands started by
    tests included."""
    import logging
    import threading
    from functools import partial
    from http.server import ThreadingHTTPServer

    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import buckets, objects
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    # Downloads as Cloud Storage serves them, where the emulator differs:
    # - they say which generation of the object they are: tensorstore conditions its writes (orbax's
    #   OCDBT manifest, read, changed, written back) on that header, and without it a save whose
    #   arrays commit in two batches fails ("Malformed StorageGeneration");
    # - a suffix range (`bytes=-N`, the last N bytes: array_record's first read of a file) gives
    #   those bytes; the emulator takes only `bytes=START-[END]`, and would send the whole object.
    download = objects.download

    def download_as_cloud_storage(request, response, storage, *args, **kwargs):
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range") or "")
        if suffix:
            try:
                size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
            except NotFound:
                size = 0
            headers = request._request_handler.headers
            del headers["Range"]
            headers["Range"] = f"bytes={max(0, size - int(suffix[1]))}-"
        download(request, response, storage, *args, **kwargs)
        if response.status < 300:
            blob = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"], response["x-goog-metageneration"] = blob["generation"], blob["metageneration"]

    objects.download = download_as_cloud_storage  # objects.get calls it for ?alt=media
    for _, routes in emulator.HANDLERS:
        routes.update({verb: download_as_cloud_storage for verb, fn in routes.items() if fn is download})

    # a thread per connection (the emulator's own server has one: a client that keeps a connection
    # open stalls every other), one request at a time (its storage takes no locks)
    lock = threading.Lock()

    def one_at_a_time(method):
        def handle(self):
            with lock:
                method(self)
        return handle

    handler = type("OneAtATime", (RequestHandler,), {f"do_{verb}": one_at_a_time(getattr(RequestHandler, f"do_{verb}"))
                                                   for verb in ("GET", "POST", "PUT", "DELETE", "PATCH")})
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every miss (a normal probe) at ERROR
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket("idefics-test", storage)
    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that hangs up early (array_record does) is no error
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), partial(handler, storage))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}"
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
                      FSSPEC_GCS_TOKEN="anon",
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # its gRPC probe would retry for minutes
                      GCE_METADATA_HOST="127.0.0.1:1", GCE_METADATA_IP="127.0.0.1:1")  # no credential lookups
    assert "gcsfs" not in sys.modules, "gcsfs was imported before its emulator variables were set"
    yield "gs://idefics-test"
    server.shutdown()


PREPROCESSOR = {"do_image_splitting": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                "rescale_factor": 1 / 255, "size": {"longest_edge": 56, "shortest_edge": 28}}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, sp_model, seed):
    """A Hugging Face directory: tiny random Idefics2 sized to the test tokenizer, tokenizer.model,
    preprocessor_config.json, and two images."""
    tokenizer = Tokenizer(sp_model[1])
    text = {**HF_TINY["text_config"], "vocab_size": tokenizer.vocab_size + 1, "max_position_embeddings": 400}
    model = build_hf_model(seed, text_config=text, image_token_id=tokenizer.token_id("<image>"))
    path = tmp_path_factory.mktemp("hf_chat")
    model.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(sp_model[1])
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    rng = np.random.default_rng(seed)
    for name, size in [("a.png", (40, 70)), ("b.png", (60, 30))]:
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path / name)
    return path, model, tokenizer
