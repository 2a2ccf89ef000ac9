"""The Grain pipeline: packing invariants, the model on packed rows, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idefics_jax import Idefics2, Idefics2Config
from idefics_jax.data.image_tokens import END_OF_UTTERANCE, IMAGE_TOKEN
from idefics_jax.data.packing import PackConfig
from idefics_jax.data.pipeline import Pipeline, SourceConfig
from idefics_jax.data.processor import Processor, apply_chat_template
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.samples import SampleError
from idefics_jax.data.tokenizer import Tokenizer
from helpers.pipelines import EDGE, SEQ_LATENTS, make_pipeline


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, seed):
    from idefics_jax.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num=40, seed=seed % 1000, num_eval=10, vocab_size=600)
    return out


def test_packing_invariants(synthetic):
    pipeline, tokenizer = make_pipeline(synthetic)
    image_id = tokenizer.token_id(IMAGE_TOKEN)
    for _ in range(6):
        batch = next(pipeline)
        assert batch["pixel_values"].shape[2:4] in ((28, 56), (56, 56))  # a static bucket
        for b in range(batch["input_ids"].shape[0]):
            seg, tokens = batch["segment_ids"][b], batch["input_ids"][b]
            slots = batch["image_segment_ids"][b]
            real = batch["pixel_attention_mask"][b].any(axis=(1, 2))
            assert (real == (slots > 0)).all()
            # image-token count = images x tokens per image, per row and per segment (sample)
            assert (tokens == image_id).sum() == real.sum() * SEQ_LATENTS
            for s in np.unique(seg[seg > 0]):
                assert ((tokens == image_id) & (seg == s)).sum() == (slots == s).sum() * SEQ_LATENTS
                span = np.flatnonzero(seg == s)
                assert (np.diff(span) == 1).all(), "a sample is contiguous"
                np.testing.assert_array_equal(batch["positions"][b][span], np.arange(len(span)))
                assert tokens[span[0]] == tokenizer.bos_id
            # slots are filled in segment order, so slot k holds the k-th image of the row
            assert (np.diff(slots[slots > 0]) >= 0).all()
            # targets are the next token of the same segment; no loss across segments or on padding
            same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
            np.testing.assert_array_equal(batch["targets"][b][:-1][same], tokens[1:][same])
            assert not batch["loss_mask"][b][:-1][~same].any() and not batch["loss_mask"][b][-1]
            assert not (batch["loss_mask"][b] & (batch["targets"][b] == image_id)).any()
    assert pipeline.stats["packed"] > 0


def test_conversation_loss_is_on_answers_only(synthetic):
    pipeline, tokenizer = make_pipeline(synthetic, names=("conversations",))
    records = [json.loads(line) for line in open(synthetic / "conversations" / "data.jsonl")]
    answers = {r["messages"][1]["content"] for r in records}
    seen = 0
    for _ in range(4):
        batch = next(pipeline)
        for b in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in np.unique(seg[seg > 0]):
                where = (seg == s) & batch["loss_mask"][b]
                text = tokenizer.decode(batch["targets"][b][where])
                assert text.endswith(END_OF_UTTERANCE), text
                assert text[: -len(END_OF_UTTERANCE)].strip() in answers, text
                seen += 1
    assert seen > 5


def test_conversation_tokens_equal_the_processor_on_the_whole_prompt(synthetic):
    """Tokenizing turn by turn (to mark answers) gives the ids of the rendered chat as one string."""
    from idefics_jax.data.samples import SampleEncoder

    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    for split in (False, True):
        processor = Processor(tokenizer, ImageProcessor(do_image_splitting=split, **EDGE), SEQ_LATENTS)
        encoder = SampleEncoder(processor, base_dir=str(synthetic / "conversations"))
        for line in list(open(synthetic / "conversations" / "data.jsonl"))[:10]:
            record = json.loads(line)
            messages = [{"role": m["role"], "content": ([{"type": "image"}] if m["content"].startswith(IMAGE_TOKEN) else [])
                         + [{"type": "text", "text": m["content"].replace(IMAGE_TOKEN, "")}]} for m in record["messages"]]
            whole = processor.encode_prompt(apply_chat_template(messages))
            assert encoder(record)["input_ids"].tolist() == whole


def test_packed_rows_give_the_logits_of_each_sample_alone(synthetic):
    """No attention crosses segments and every image reaches its own tokens: the model on a packed
    row equals the model on each of its samples alone."""
    pipeline, tokenizer = make_pipeline(synthetic, names=("pairs", "interleaved", "conversations"),
                                        pack=PackConfig(seq_len=300, image_slots=6, buckets=((56, 56),)))
    config = Idefics2Config.preset("tiny")
    config = config.replace(
        vision=config.vision.replace(image_size=56, patch_size=7),
        perceiver=config.perceiver.replace(resampler_n_latents=SEQ_LATENTS),
        text=config.text.replace(vocab_size=tokenizer.vocab_size, sliding_window=64),
        image_token_id=tokenizer.token_id(IMAGE_TOKEN))
    model = Idefics2(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    forward = jax.jit(lambda p, **kw: model.apply({"params": p}, **kw))
    batch = next(pipeline)
    b = int(np.argmax([len(np.unique(s[s > 0])) for s in batch["segment_ids"]]))  # the fullest row
    packed = forward(params, input_ids=batch["input_ids"][b:b + 1], pixel_values=batch["pixel_values"][b:b + 1],
                     pixel_attention_mask=batch["pixel_attention_mask"][b:b + 1],
                     segment_ids=batch["segment_ids"][b:b + 1], positions=batch["positions"][b:b + 1])
    seg, slots = batch["segment_ids"][b], batch["image_segment_ids"][b]
    assert len(np.unique(seg[seg > 0])) >= 2
    for s in np.unique(seg[seg > 0]):
        span = np.flatnonzero(seg == s)
        mine = np.flatnonzero(slots == s)
        kwargs = {}
        if len(mine):
            kwargs = dict(pixel_values=batch["pixel_values"][b:b + 1, mine],
                          pixel_attention_mask=batch["pixel_attention_mask"][b:b + 1, mine])
        alone = forward(params, input_ids=batch["input_ids"][b:b + 1, span], **kwargs)
        err = float(jnp.abs(packed[0, span] - alone[0]).max() / jnp.abs(alone).max())
        assert err < 1e-5, f"segment {s}: {err}"


@pytest.mark.parametrize("fmt", ["array_record", "tfds"])
def test_formats_give_the_same_batches_as_jsonl(synthetic, fmt):
    reference, _ = make_pipeline(synthetic)
    other, _ = make_pipeline(synthetic, fmt=fmt)
    for _ in range(3):
        a, b = next(reference), next(other)
        for key in ("input_ids", "loss_mask", "pixel_values", "image_segment_ids"):
            np.testing.assert_array_equal(a[key], b[key])


def test_mixture_follows_the_weights(synthetic):
    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    sources = [SourceConfig("pairs", str(synthetic / "pairs"), weight=0.7, **EDGE),
               SourceConfig("documents", str(synthetic / "documents"), weight=0.3, **EDGE)]
    pipeline = Pipeline(sources, tokenizer, PackConfig(seq_len=400, image_slots=4, buckets=((56, 56),)), 4,
                        image_seq_len=SEQ_LATENTS, seed=3, shard_index=0, shard_count=1)
    for _ in range(25):
        next(pipeline)
    pairs, docs = pipeline.stats["packed/pairs"], pipeline.stats["packed/documents"]
    assert abs(pairs / (pairs + docs) - 0.7) < 0.08, (pairs, docs)


def test_hosts_read_disjoint_shards(synthetic):
    batches = []
    for index in range(2):
        pipeline, _ = make_pipeline(synthetic, names=("pairs",), shard_index=index, shard_count=2, batch_size=2)
        batches.append(next(pipeline)["input_ids"])
    assert not np.array_equal(batches[0], batches[1])


RESUME_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from helpers.pipelines import make_pipeline
from pathlib import Path
pipeline, _ = make_pipeline(Path({data!r}), num_workers={workers})
pipeline.load_state({state!r})
out = [next(pipeline) for _ in range(3)]
np.savez({out!r}, **{{f"{{i}}_{{k}}": b[k] for i, b in enumerate(out) for k in ("input_ids", "loss_mask", "pixel_values")}})
print(json.dumps(pipeline.stats))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_process_gives_the_next_batches(synthetic, tmp_path, workers):
    pipeline, _ = make_pipeline(synthetic, num_workers=workers)
    for _ in range(3):
        next(pipeline)
    pipeline.save_state(tmp_path / "state.json")
    expected = [next(pipeline) for _ in range(3)]
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), data=str(synthetic), workers=workers,
                                  state=str(tmp_path / "state.json"), out=str(tmp_path / "out.npz"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for key in ("input_ids", "loss_mask", "pixel_values"):
            np.testing.assert_array_equal(got[f"{i}_{key}"], batch[key], err_msg=f"batch {i} {key}")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == dict(pipeline.stats)


def test_same_seed_same_batches(synthetic):
    a, _ = make_pipeline(synthetic, seed=5)
    b, _ = make_pipeline(synthetic, seed=5)
    c, _ = make_pipeline(synthetic, seed=6)
    first = [next(a)["input_ids"] for _ in range(2)]
    assert all(np.array_equal(x, next(b)["input_ids"]) for x in first)
    assert not np.array_equal(first[0], next(c)["input_ids"])


def test_reader_threads_do_not_change_the_batches(synthetic):
    """read_threads / read_buffer only change speed: the same batches and the same resumable state."""
    a, _ = make_pipeline(synthetic, seed=3)
    b, _ = make_pipeline(synthetic, seed=3, read_threads=1, read_buffer=2)
    for _ in range(3):
        x, y = next(a), next(b)
        for key in ("input_ids", "targets", "segment_ids", "pixel_values"):
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert a.get_state() == b.get_state()


@pytest.fixture
def bad_data(synthetic, tmp_path):
    """A copy of the pairs source with broken records of every kind mixed in."""
    out = tmp_path / "bad"
    shutil.copytree(synthetic / "pairs", out)
    images = out / "images"
    good = sorted(images.glob("*.png"))[0].read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "garbage.png").write_bytes(b"this is not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("P").save(images / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(images / "sixteen.png")
    bad = [
        {"id": "truncated", "type": "pair", "image": "images/truncated.png", "text": "x"},
        {"id": "garbage", "type": "pair", "image": "images/garbage.png", "text": "x"},
        {"id": "missing", "type": "pair", "image": "images/nope.png", "text": "x"},
        {"id": "mismatch", "type": "conversation", "images": [],
         "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "cmyk", "type": "pair", "image": "images/cmyk.jpg", "text": "cmyk image"},
        {"id": "palette", "type": "pair", "image": "images/palette.png", "text": "palette image"},
        {"id": "sixteen", "type": "pair", "image": "images/sixteen.png", "text": "16-bit image"},
    ]
    lines = open(out / "data.jsonl").read().splitlines()
    for i, record in enumerate(bad):
        lines.insert(3 * i + 1, json.dumps(record))
    lines.insert(5, "{not json")
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_bad_samples_are_skipped_counted_and_strict_mode_raises(bad_data, synthetic):
    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    source = SourceConfig("bad", str(bad_data), **EDGE)
    pack = PackConfig(seq_len=400, image_slots=8, buckets=((56, 56),))
    pipeline = Pipeline([source], tokenizer, pack, 4, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                        repeat=False)
    batches = list(pipeline)
    assert batches, "one bad sample never stops the pipeline"
    stats = pipeline.stats
    assert stats["skipped/bad_image"] == 2 and stats["skipped/missing_file"] == 1
    assert stats["skipped/image_count_mismatch"] == 1 and stats["skipped/bad_record"] == 1
    assert stats["packed"] == 40 + 3  # the good records plus the CMYK, palette and 16-bit ones
    assert "skipped/bad_image: 2" in pipeline.summary()
    strict = Pipeline([source], tokenizer, pack, 4, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                      repeat=False, strict=True)
    with pytest.raises(SampleError, match="source 'bad', sample"):
        list(strict)


def test_too_long_samples_are_dropped_not_truncated(synthetic):
    pipeline, _ = make_pipeline(synthetic, names=("documents",), max_length_documents=60, repeat=False)
    batches = list(pipeline)
    assert pipeline.stats["skipped/too_long"] > 0
    for batch in batches:
        for seg in batch["segment_ids"]:
            assert all((seg == s).sum() <= 60 for s in np.unique(seg[seg > 0]))


def test_prepare_script_checks_and_converts(bad_data, synthetic, tmp_path):
    script = Path(__file__).parents[1] / "data" / "prepare.py"
    run = lambda *args: subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    tokenizer = synthetic / "tokenizer.model"
    ok = run("check", synthetic / "pairs", "--tokenizer", tokenizer, "--image-seq-len", 8)
    assert ok.returncode == 0 and "40 usable, no problems" in ok.stdout, ok.stdout + ok.stderr
    bad = run("check", bad_data, "--tokenizer", tokenizer, "--image-seq-len", 8)
    assert bad.returncode == 1
    assert "bad_image 2" in bad.stdout and "missing_file 1" in bad.stdout and "image_count_mismatch 1" in bad.stdout
    assert "truncated" in bad.stderr  # each problem names its record
    converted = run("array_record", synthetic / "documents", tmp_path / "ar", "--shards", 3)
    assert converted.returncode == 0, converted.stderr
    from idefics_jax.data.sources import ArrayRecordSource, JsonlSource

    a, b = JsonlSource(synthetic / "documents"), ArrayRecordSource(tmp_path / "ar")
    assert len(a) == len(b) and [a[i]["id"] for i in range(len(a))] == [b[i]["id"] for i in range(len(b))]


def test_easy_synthetic_data_has_few_words_and_digits(tmp_path):
    from idefics_jax.data.synthetic import EASY_WORDS, generate

    generate(tmp_path, num=30, seed=1, num_eval=5, formats=("jsonl",), vocab_size=600, easy=True)
    answers = [json.loads(line)["messages"][1]["content"] for line in open(tmp_path / "conversations" / "data.jsonl")]
    assert all(a in EASY_WORDS or (a.isdigit() and int(a) < 10) for a in answers), answers
    sizes = [Image.open(p).size for p in sorted((tmp_path / "conversations" / "images").iterdir())]
    assert all(w >= 20 and h >= 20 for w, h in sizes)
