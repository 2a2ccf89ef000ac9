"""The Grain pipeline: packing invariants, the model on packed rows, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
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
from helpers.inputs import png_header
from helpers.training import open_gates
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


@pytest.mark.parametrize("connector,architecture", [("perceiver", "fully_autoregressive"),
                                                    ("mlp", "fully_autoregressive"),
                                                    ("pixel_shuffle", "fully_autoregressive"),
                                                    ("perceiver", "cross_attention")])
def test_packed_rows_give_the_logits_of_each_sample_alone(synthetic, connector, architecture):
    """No attention crosses segments and every image reaches its own tokens: the model on a packed
    row equals the model on each of its samples alone (with each connector; mlp and pixel_shuffle
    on square images, 64 and 16 tokens each; cross-attention, one marker token each, gates open)."""
    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    config = Idefics2Config.preset("tiny")
    config = config.replace(
        vision=config.vision.replace(image_size=56, patch_size=7),
        perceiver=config.perceiver.replace(resampler_n_latents=SEQ_LATENTS),
        text=config.text.replace(vocab_size=tokenizer.vocab_size, sliding_window=64),
        image_token_id=tokenizer.token_id(IMAGE_TOKEN), connector=connector, architecture=architecture,
        cross_attention_every=1)
    pipeline, tokenizer = make_pipeline(synthetic, names=("pairs", "interleaved", "conversations"),
                                        pack=PackConfig(seq_len=600, image_slots=6, buckets=((56, 56),)),
                                        image_seq_len=config.image_seq_len,
                                        image_sizing="keep_aspect" if connector == "perceiver" else "square")
    model = Idefics2(config)
    params = open_gates(nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]))
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
    (images / "huge.png").write_bytes(png_header(20000, 20000))  # beyond PIL's own limit
    (images / "large.png").write_bytes(png_header(9000, 9000))  # beyond ours (64M pixels), within PIL's
    bad = [
        {"id": "huge", "type": "pair", "image": "images/huge.png", "text": "x"},
        {"id": "large", "type": "pair", "image": "images/large.png", "text": "x"},
        {"id": "number", "type": "pair", "image": 5, "text": "x"},
        {"id": "role", "type": "conversation", "images": [],
         "messages": [{"role": 5, "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "content", "type": "interleaved", "content": "not a list of parts"},
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
    lines.insert(9, "[1, 2, 3]")
    lines.insert(11, '"a string"')
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
    assert stats["skipped/image_count_mismatch"] == 1 and stats["skipped/image_too_large"] == 2
    assert stats["skipped/bad_record"] == 6  # bad JSON, two non-objects, an int path, an int role, a string content
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


def mutated(record: dict, rng: np.random.Generator, images: Path, index: int) -> str:
    """A copy of `record` broken at random (its image's bytes, a field's presence, type or length, the
    `<image>` count), or a line that is not a record at all; the jsonl line."""
    import copy

    record, kind = copy.deepcopy(record), int(rng.integers(7))
    record["id"] = f"mutant-{index}"
    if kind == 0:  # the image's bytes: cut, flipped, emptied, or a header of too many pixels
        refs = record.get("images") or [record.get("image")] if "content" not in record else \
            [p["image"] for p in record["content"] if p["type"] == "image"]
        if refs and refs[0]:
            data = bytearray((images.parent / refs[0]).read_bytes())
            how = int(rng.integers(4))
            if how == 0:
                data = data[:int(rng.integers(len(data)))]
            elif how == 1:
                start = int(rng.integers(len(data)))
                data[start:start + 16] = rng.integers(0, 256, len(data[start:start + 16]), dtype=np.uint8).tobytes()
            elif how == 2:
                data = b""
            else:
                data = png_header(int(rng.integers(8001, 30000)), int(rng.integers(8001, 30000)))
            name = f"images/mutant-{index}.png"
            (images.parent / name).write_bytes(bytes(data))
            text = json.dumps(record).replace(json.dumps(refs[0]), json.dumps(name), 1)
            return text
    if kind == 1:  # a field removed
        record.pop(list(record)[int(rng.integers(len(record)))])
    elif kind == 2:  # a field of another type, at the top or one level down
        value = [5, None, [1, "x"], {"a": 1}, "text", 2.5, True][int(rng.integers(7))]
        target = record
        nested = [v for v in record.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if nested and rng.random() < 0.5:
            target = nested[0][int(rng.integers(len(nested[0])))]
        target[list(target)[int(rng.integers(len(target)))]] = value
    elif kind == 3:  # lengths: a text far past max_length, or empty everywhere
        long = " ".join(["word"] * int(rng.integers(3000, 6000))) if rng.random() < 0.7 else ""
        for part in record.get("messages", record.get("content", [])):
            for key in ("text", "content"):
                if key in part and isinstance(part[key], str) and "<image>" not in part[key]:
                    part[key] = long
        if "text" in record:
            record["text"] = long
    elif kind == 4:  # <image> placeholders and images that no longer agree
        if "messages" in record:
            record["messages"][0]["content"] += "<image>" * int(rng.integers(1, 3))
        elif "content" in record:
            record["content"].append({"type": "text", "text": "and <image> here"})
        else:
            record["text"] = "<image> " + str(record.get("text"))
    elif kind == 5:  # not an object, or not JSON
        return ["[1, 2, 3]", "null", "42", '"text"', json.dumps(record)[:-7], "{]"][int(rng.integers(6))]
    else:  # a record type nobody knows, or a part of one
        record["type"] = ["pairs", "", None, 3, "_invalid"][int(rng.integers(5))]
    return json.dumps(record)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, for images refused anyway
def test_a_thousand_mutated_records_never_stop_the_pipeline(synthetic, tmp_path, seed, caplog):
    """1,000 records broken at random among the four sources' good ones: the pipeline reads the
    epoch without an error, accounts for every record (packed, skipped or dropped, by reason), and
    packs every good one; `prepare.py check` reads the same file to the end."""
    rng = np.random.default_rng(seed)
    out = tmp_path / "fuzz"
    (out / "images").mkdir(parents=True)
    good = []
    for name in ("pairs", "documents", "interleaved", "conversations"):
        for line in (synthetic / name / "data.jsonl").read_text().splitlines():
            good.append(json.loads(line))
        for image in (synthetic / name / "images").iterdir():
            shutil.copy(image, out / "images" / image.name)
    lines = [json.dumps(r) for r in good]
    for i in range(1000):
        lines.insert(int(rng.integers(len(lines) + 1)), mutated(good[int(rng.integers(len(good)))], rng,
                                                                  out / "images", i))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")

    tokenizer = Tokenizer(synthetic / "tokenizer.model")
    source = SourceConfig("fuzz", str(out), max_length=300, **EDGE)
    pack = PackConfig(seq_len=400, image_slots=8, buckets=((56, 56),))
    pipeline = Pipeline([source], tokenizer, pack, 4, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                        repeat=False, read_threads=1, read_buffer=8)
    with caplog.at_level("WARNING", logger="idefics_jax.data.packing"):
        batches = list(pipeline)
    stats = pipeline.stats
    skipped = sum(v for k, v in stats.items() if k.startswith(("skipped/", "dropped/")))
    assert stats["packed"] + skipped == len(lines), stats
    assert skipped >= 500, stats  # most mutations break their record (some leave it usable)
    assert {k.split("/")[1] for k in stats if k.startswith("skipped/")} >= {
        "bad_image", "bad_record", "image_too_large", "image_count_mismatch", "too_long"}, stats
    refused = " ".join(r.getMessage() for r in caplog.records)
    assert not [r["id"] for r in good if f"fuzz/{r['id']} " in refused], "a good record was skipped"
    assert sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches) > 0

    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "data" / "prepare.py"), "check", str(out),
                           "--tokenizer", str(synthetic / "tokenizer.model"), "--max-length", "300"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    usable = stats["packed"] + sum(v for k, v in stats.items() if k.startswith("dropped/"))  # check does not pack
    assert f"{len(lines)} records: {usable} usable" in done.stdout, done.stdout
