"""Published training data read as distributed: The Cauldron / Docmatix rows in Parquet (the Hub's
files) and Arrow (the `datasets` library's cache), caption pairs, and PDFA's WebDataset tar shards,
made here in exactly their schemas, bad rows included."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers.pipelines import EDGE, SEQ_LATENTS
from helpers.published import CAULDRON, cauldron_rows, encoded, pdf_of, pdfa_ocr, write_tar
from idefics_jax.data.image_tokens import IMAGE_TOKEN
from idefics_jax.data.packing import PackConfig
from idefics_jax.data.pipeline import Pipeline, SourceConfig
from idefics_jax.data.processor import Processor
from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.samples import SampleEncoder, SampleError
from idefics_jax.data.sources import TableSource
from idefics_jax.data.tokenizer import Tokenizer

@pytest.fixture(scope="module")
def cauldron(tmp_path_factory, seed):
    """A Cauldron subset as two Parquet files of small row groups, and the same rows as an Arrow stream."""
    rng = np.random.default_rng([seed, 30])
    rows, good = cauldron_rows(rng, 24)
    out = tmp_path_factory.mktemp("cauldron")
    (out / "parquet").mkdir()
    half = len(rows) // 2
    for k, part in enumerate([rows[:half], rows[half:]]):
        pq.write_table(pa.Table.from_pylist(part, schema=CAULDRON), out / "parquet" / f"train-0000{k}-of-00002.parquet",
                       row_group_size=4)
    with pa.OSFile(str(out / "data-00000-of-00001.arrow"), "wb") as sink:  # the `datasets` cache: an IPC stream
        with pa.ipc.new_stream(sink, CAULDRON) as writer:
            writer.write_table(pa.Table.from_pylist(rows, schema=CAULDRON), max_chunksize=5)
    return out, rows, good


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, seed):
    from conftest import train_sentencepiece

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train_sentencepiece(seed))
    return Tokenizer(path)


def test_rows_become_multi_turn_conversations_with_answer_only_loss(cauldron, tokenizer):
    out, rows, _ = cauldron
    source = TableSource(out / "parquet", "parquet")
    assert source.schema == "the_cauldron" and len(source) == len(rows)
    arrow = TableSource(out / "data-00000-of-00001.arrow", "arrow")
    index = next(i for i, r in enumerate(rows) if len(r["texts"]) > 1 and len(r["images"]) == 2)
    record, same = source[index], arrow[index]
    content = lambda r: {k: v for k, v in r.items() if k not in ("id", "_at")}  # ids and places name the file
    assert content(record) == content(same) and record["id"].startswith("vqav2/train-0000")
    row = rows[index]
    assert record["images"] == ["image_0", "image_1"]
    assert record["_image_bytes"]["image_1"] == row["images"][1]["bytes"]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * len(row["texts"])
    assert record["messages"][0]["content"] == IMAGE_TOKEN * 2 + row["texts"][0]["user"]
    assert record["messages"][2]["content"] == row["texts"][1]["user"]  # the images lead the first turn only
    assert record["messages"][-1]["content"] == row["texts"][-1]["assistant"]
    encoder = SampleEncoder(Processor(tokenizer, ImageProcessor(**EDGE), SEQ_LATENTS), max_length=4096)
    sample = encoder(record)
    trained = tokenizer.decode(sample["input_ids"][sample["targets"]].tolist())
    for turn in row["texts"]:  # every answer is learned, no question is
        assert turn["assistant"] in trained and turn["user"] not in trained
    assert len(sample["images"]) == 2


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_bad_rows_are_skipped_counted_and_named_and_strict_raises(cauldron, tokenizer, fmt, caplog):
    out, rows, good = cauldron
    path = out / "parquet" if fmt == "parquet" else out / "data-00000-of-00001.arrow"
    source = SourceConfig("cauldron", str(path), format=fmt, **EDGE)
    pack = PackConfig(seq_len=512, image_slots=8, buckets=((56, 56),))
    pipeline = Pipeline([source], tokenizer, pack, 2, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                        repeat=False)
    with caplog.at_level("WARNING", logger="idefics_jax.data.packing"):
        list(pipeline)
    stats = pipeline.stats
    assert stats["packed"] == good, stats
    assert stats["skipped/bad_image"] == 1 and stats["skipped/bad_record"] == 4, stats
    if fmt == "parquet":  # named by file and row
        assert "train-00000-of-00002.parquet#2" in caplog.text and "images[0] has no bytes" in caplog.text
        assert "`texts` is empty" in caplog.text and "texts[0].user is NoneType, not text" in caplog.text
    strict = Pipeline([source], tokenizer, pack, 2, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                      repeat=False, strict=True)
    with pytest.raises(SampleError, match="source 'cauldron', sample"):
        list(strict)


def test_columns_that_fit_no_schema_are_named(tmp_path):
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\] fit no known schema"):
        TableSource(tmp_path / "x.parquet", "parquet")
    with pytest.raises(FileNotFoundError, match="No .parquet files"):
        TableSource(tmp_path / "empty", "parquet")


def test_prepare_check_reads_the_files_as_downloaded(cauldron, tokenizer, tmp_path, capsys):
    import importlib.util
    import pickle
    from pathlib import Path

    out, rows, good = cauldron
    source = TableSource(out / "parquet", "parquet")
    copy = pickle.loads(pickle.dumps(source))  # as grain's worker processes receive it
    assert copy[len(rows) - 1] == source[len(rows) - 1]
    spec = importlib.util.spec_from_file_location("prepare", Path(__file__).parents[1] / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    tokenizer_path = tmp_path / "tokenizer.model"
    tokenizer_path.write_bytes(tokenizer.sp.serialized_model_proto())
    assert prepare.main(["check", str(out / "parquet"), "--tokenizer", str(tokenizer_path), "--max-length", "4096"]) == 1
    captured = capsys.readouterr()
    assert f"{len(rows)} records: {good} usable, bad_image 1, bad_record 4" in captured.out, captured
    shown = [line for line in captured.out.splitlines() if line.startswith("sample ")]
    assert len(shown) == 3 and "(conversation): images" in shown[0] and "Assistant:" in captured.out
    assert "train-00000-of-00002.parquet#2" in captured.err
    assert prepare.main(["check", str(out / "parquet"), "--samples", "1"]) == 1  # no tokenizer: records read
    captured = capsys.readouterr()
    assert f"{len(rows)} records: {good + 1} usable, bad_record 4" in captured.out and "Question 0" in captured.out
    assert prepare.main(["check", str(tmp_path), "--tokenizer", str(tokenizer_path)]) == 2
    assert "No data.jsonl, .array_record, .parquet, .arrow or .tar files" in capsys.readouterr().err


def test_caption_pairs_from_their_columns(tmp_path, tokenizer, seed, caplog):
    """Image-caption pairs: `datasets`' image structs with a `caption` column (told from the names),
    raw bytes with columns named in the config, and paths beside the files; bad rows named."""
    rng = np.random.default_rng([seed, 31])
    (tmp_path / "images").mkdir()
    png = encoded(rng, "PNG")
    (tmp_path / "images" / "a.png").write_bytes(png)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": encoded(rng, "JPEG"), "path": None}, {"bytes": None, "path": "images/a.png"},
                           {"bytes": None, "path": None}, {"bytes": png, "path": None}], image),
        "caption": ["a red boat", "a cat", "nothing", None]}), tmp_path / "structs.parquet")
    (tmp_path / "named").mkdir()
    pq.write_table(pa.table({"pixels": [png, encoded(rng, "JPEG")], "alt": ["seven trees", "a <image> here"],
                             "url": ["u0", "u1"]}), tmp_path / "named" / "part-0.parquet")

    source = TableSource(tmp_path / "structs.parquet", "parquet")
    assert source.schema == "pairs" and source.options == {"image": "image", "text": "caption"}
    assert source[0]["type"] == "pair" and source[0]["text"] == "a red boat" and source[0]["_image_bytes"]["image"]
    assert source[1]["image"] == "images/a.png" and "_image_bytes" not in source[1]
    assert source[2]["_error"] == "`image` has neither bytes nor a path"
    assert source[3]["_error"] == "`caption` is NoneType, not text"
    with pytest.raises(ValueError, match=r"No image column among \['image'"):
        TableSource(tmp_path / "named", "parquet", schema="pairs")
    named = TableSource(tmp_path / "named", "parquet", image_column="pixels", text_column="alt")  # pairs, then
    assert named[0]["text"] == "seven trees" and named[1]["_error"] == "`alt` spells <image>"

    pack = PackConfig(seq_len=256, image_slots=4, buckets=((56, 56),))
    for config, packed, skipped in [(SourceConfig("pairs", str(tmp_path / "structs.parquet"), format="parquet", **EDGE), 2, 2),
                                    (SourceConfig("named", str(tmp_path / "named"), format="parquet",
                                                  image_column="pixels", text_column="alt", **EDGE), 1, 1)]:
        pipeline = Pipeline([config], tokenizer, pack, 2, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                            repeat=False)
        list(pipeline)
        assert pipeline.stats["packed"] == packed and pipeline.stats["skipped/bad_record"] == skipped, pipeline.stats


def test_pdfa_shards_become_rendered_pages_with_their_ocr(tmp_path, tokenizer, seed, caplog):
    from idefics_jax.data.sources import TarSource

    rng = np.random.default_rng([seed, 32])
    (tmp_path / "pdfa").mkdir()
    write_tar(tmp_path / "pdfa" / "pdfa-eng-train-000000.tar", [
        ("doc-a.pdf", pdf_of(2, rng)), ("doc-a.json", pdfa_ocr([["Invoice 7", "total 42"], ["page two"]])),
        ("doc-b.pdf", b"%PDF-1.4 not really"), ("doc-b.json", pdfa_ocr([["a page"]])),
        ("doc-c.pdf", pdf_of(1, rng)),  # its OCR is missing
        ("doc-d.pdf", pdf_of(2, rng)), ("doc-d.json", pdfa_ocr([["words"], []])),  # page 1: no text
    ])
    write_tar(tmp_path / "pdfa" / "pdfa-eng-train-000001.tar", [
        ("doc-e.pdf", pdf_of(1, rng)), ("doc-e.json", pdfa_ocr([["the end"]])),
        ("doc-f.json", pdfa_ocr([["cut"]])), ("doc-f.pdf", pdf_of(1, rng))], cut=True)
    source = TarSource(tmp_path / "pdfa", dpi=72)
    assert source.schema == "pdfa" and (tmp_path / "pdfa" / "pdfa-eng-train-000000.tar.index.json").exists()
    records = [source[i] for i in range(len(source))]
    good = [r for r in records if r["type"] == "document"]
    assert [r["text"] for r in good] == ["Invoice 7\ntotal 42", "page two", "words", "the end"]
    assert good[0]["_image_bytes"]["page"].size[0] > 50  # rendered at 72 dpi, about the page's pixels
    errors = {r["_at"]: r["_error"] for r in records if r["type"] == "_invalid"}
    assert "cannot be rendered" in errors["pdfa-eng-train-000000.tar:doc-b#page0"]
    assert errors["pdfa-eng-train-000000.tar:doc-c#page0"] == "the sample has no .json member"
    assert errors["pdfa-eng-train-000000.tar:doc-d#page1"] == "page 1 has no OCR text"
    assert errors["pdfa-eng-train-000001.tar:doc-f#page0"] == "the .pdf member is cut short", errors
    assert TarSource(tmp_path / "pdfa", dpi=72)._samples == source._samples  # the index read back

    pack = PackConfig(seq_len=512, image_slots=4, buckets=((56, 56),))
    config = SourceConfig("pdfa", str(tmp_path / "pdfa"), format="webdataset", dpi=72, max_length=4096, **EDGE)
    pipeline = Pipeline([config], tokenizer, pack, 1, image_seq_len=SEQ_LATENTS, shard_index=0, shard_count=1,
                        repeat=False)
    list(pipeline)
    assert pipeline.stats["packed"] == 4 and pipeline.stats["skipped/bad_record"] == len(records) - 4, pipeline.stats

    # converted to ArrayRecord: the rendered pages stored as PNG
    import os
    import subprocess
    import sys
    from pathlib import Path

    from idefics_jax.data.sources import ArrayRecordSource

    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "data" / "prepare.py"), "array_record",
                           str(tmp_path / "pdfa"), str(tmp_path / "ar"), "--dpi", "72"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0 and "4 records kept from 2 files" in done.stdout, done.stdout + done.stderr[-2000:]
    stored = ArrayRecordSource(tmp_path / "ar")
    assert sorted(stored[i]["text"] for i in range(len(stored))) == sorted(r["text"] for r in good)
    page = Image.open(io.BytesIO(stored[0]["_image_bytes"]["page"]))
    assert page.format == "PNG" and page.size[0] > 50


def test_caption_pairs_in_tar_shards(tmp_path, seed):
    from idefics_jax.data.sources import TarSource

    rng = np.random.default_rng([seed, 33])
    write_tar(tmp_path / "pairs-0.tar", [("000.jpg", encoded(rng, "JPEG")), ("000.txt", b"a red boat"),
                                         ("001.jpg", encoded(rng, "JPEG")), ("001.txt", b"\xff\xfe bad utf-8"),
                                         ("002.jpg", encoded(rng, "JPEG"))])
    source = TarSource(tmp_path / "pairs-0.tar")
    assert source.schema == "pairs" and source.columns == {"image": "jpg", "text": "txt"}
    assert source[0]["text"] == "a red boat" and source[0]["_image_bytes"]["image"][:2] == b"\xff\xd8"
    assert source[1]["type"] == "_invalid" and "utf-8" in source[1]["_error"]
    assert source[2]["_error"] == "the sample has no .txt member"


def test_prepare_converts_to_array_record_in_parallel_and_resumes(cauldron, tmp_path):
    """Parquet files -> ArrayRecord shards, one per input file, two at once; a file already converted
    is skipped when the command runs again (after a kill: a `.partial` left behind is redone); the
    records read back equal the source's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from idefics_jax.data.sources import ArrayRecordSource

    out, rows, good = cauldron
    script = Path(__file__).parents[1] / "data" / "prepare.py"
    run = lambda: subprocess.run([sys.executable, str(script), "array_record", str(out / "parquet"), str(tmp_path / "ar"),
                                  "--workers", "2"], capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    # the row with undecodable image bytes fits the schema: it is kept (training skips it, as `check` reports)
    assert f"{good + 1} records kept from 2 files (0 converted before); skipped/bad_record 4" in done.stdout, done.stdout
    first = sorted((tmp_path / "ar").glob("*.array_record"))
    assert [p.name for p in first] == ["train-00000-of-00002.parquet.array_record",
                                       "train-00001-of-00002.parquet.array_record"]
    for suffix in ("", ".summary.json"):  # as if killed while writing the second file
        (tmp_path / "ar" / f"train-00001-of-00002.parquet.array_record{suffix}").unlink()
    (tmp_path / "ar" / "train-00001-of-00002.parquet.array_record.partial").write_bytes(b"half")
    again = run()
    assert again.returncode == 0 and "(1 converted before)" in again.stdout, again.stdout + again.stderr[-2000:]
    converted = ArrayRecordSource(tmp_path / "ar")
    source = TableSource(out / "parquet", "parquet")
    expected = [r for r in (source[i] for i in range(len(source))) if r["type"] != "_invalid"]
    assert len(converted) == good + 1
    for ours, theirs in zip((converted[i] for i in range(len(converted))), expected):
        assert ours["messages"] == theirs["messages"] and ours["_image_bytes"] == theirs["_image_bytes"]


def test_a_pipeline_mixing_parquet_and_tar_resumes_mid_epoch_exactly(cauldron, tokenizer, tmp_path, seed):
    rng = np.random.default_rng([seed, 35])
    write_tar(tmp_path / "pdfa-0.tar", [item for k in range(4) for item in
                                        [(f"d{k}.pdf", pdf_of(2, rng)), (f"d{k}.json", pdfa_ocr([["page one"], ["two"]]))]])
    out, _, _ = cauldron
    sources = [SourceConfig("cauldron", str(out / "parquet"), format="parquet", weight=0.6, **EDGE),
               SourceConfig("pdfa", str(tmp_path / "pdfa-0.tar"), format="webdataset", weight=0.4, dpi=36, **EDGE)]
    make = lambda: Pipeline(sources, tokenizer, PackConfig(seq_len=512, image_slots=8, buckets=((56, 56),)), 2,
                            image_seq_len=SEQ_LATENTS, seed=5, shard_index=0, shard_count=1)
    first = make()
    for _ in range(4):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("input_ids", "loss_mask", "pixel_values"):
            np.testing.assert_array_equal(got[key], want[key])
    assert first.stats["packed/pdfa"] > 0 and first.stats["packed/cauldron"] > 0


def obelics_images(rng, n: int) -> dict[str, bytes]:
    return {f"https://img.example.com/{k}/photo.{['png', 'jpg'][k % 2]}?w=64": encoded(rng, ["PNG", "JPEG"][k % 2])
            for k in range(n)}


@pytest.mark.parametrize("layout", ["webdataset", "files", "parquet", "array_record"])
def test_image_stores_find_images_by_url(tmp_path, seed, layout, monkeypatch):
    """Each layout of downloaded images, indexed once beside the store: every image by its URL, a
    failed download and an unknown URL told apart, the index read back (not rebuilt) and rebuilt
    when the store's files change, and the store sent to a worker process."""
    import pickle

    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    from helpers.published import img2dataset_store
    from idefics_jax.data.image_store import ImageStore, MissingImage

    rng = np.random.default_rng([seed, 36])
    images, failed = obelics_images(rng, 9), ["https://img.example.com/gone.jpg"]
    store_dir = tmp_path / "store"
    if layout == "array_record":
        store_dir.mkdir()
        writer = ArrayRecordWriter(str(store_dir / "images-0.array_record"), "group_size:1")
        for url, data in images.items():
            writer.write(msgpack.packb({"url": url, "image": data}, use_bin_type=True))
        writer.close()
    else:
        img2dataset_store(store_dir, layout, images, failed)
    store = ImageStore(store_dir)
    assert store.layout == layout and len(store) == len(images) and (store_dir / "url_index" / "meta.json").exists()
    assert store.failed == (0 if layout in ("parquet", "array_record") else 1)
    for url, data in images.items():
        assert store.get(url) == data, url
    with pytest.raises(MissingImage, match="not in the image store"):
        store.get("https://img.example.com/never-fetched.png")
    if layout in ("webdataset", "files"):
        with pytest.raises(MissingImage, match=r"not downloaded \(failed_to_download\)"):
            store.get(failed[0])
    copy = pickle.loads(pickle.dumps(store))
    assert copy._index is None and copy.get(next(iter(images))) == next(iter(images.values()))
    monkeypatch.setattr(ImageStore, "_build", lambda self: pytest.fail("indexed again"))
    assert ImageStore(store_dir).get(list(images)[-1]) == list(images.values())[-1]
    monkeypatch.undo()
    if layout != "array_record":  # a shard added: indexed again
        more = {"https://img.example.com/late.png": encoded(rng, "PNG")}
        img2dataset_store(tmp_path / "late", layout, more, [], shards=1)
        for f in (tmp_path / "late").iterdir():
            if f.is_file():
                f.rename(store_dir / f.name.replace("00000", "00007"))
            else:
                f.rename(store_dir / "00007")
        assert ImageStore(store_dir).get("https://img.example.com/late.png") == more["https://img.example.com/late.png"]


@pytest.fixture(scope="module")
def obelics(tmp_path_factory, seed):
    """OBELICS rows in Parquet (published schema) and their images in an img2dataset webdataset store;
    some rows name an image whose download failed or that was never fetched, some are malformed."""
    from helpers.published import OBELICS, img2dataset_store, obelics_row

    rng = np.random.default_rng([seed, 37])
    out = tmp_path_factory.mktemp("obelics")
    images = obelics_images(rng, 12)
    urls = list(images)
    gone, never = "https://img.example.com/gone.jpg", "https://img.example.com/never.jpg"
    img2dataset_store(out / "images", "webdataset", images, [gone])
    rows = [
        obelics_row([("text", "A title"), ("image", urls[0]), ("text", "First paragraph."), ("text", "Second."),
                     ("image", urls[1])]),
        obelics_row([("image", urls[2]), ("text", "Caption-like text under a photo.")]),
        obelics_row([("text", "Before"), ("image", gone), ("text", "after the lost image.")]),
        obelics_row([("text", "A page"), ("image", never), ("image", urls[3]), ("text", "with two images.")]),
        obelics_row([("text", "Only words, no images at all.")]),
        obelics_row([("image", urls[4]), ("image", urls[5])]),  # no text: nothing to learn
        {**obelics_row([("text", "x")]), "images": [urls[6]], "texts": ["both here"]},  # a position with both
        {**obelics_row([("text", "x")]), "texts": ["y", "z"]},  # lists of different lengths
    ] + [obelics_row([("text", f"Document {k}."), ("image", urls[6 + k % 6])]) for k in range(6)]
    (out / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OBELICS), out / "parquet" / "train-00000-of-00001.parquet",
                   row_group_size=5)
    return out, rows, images


def test_obelics_documents_interleave_their_downloaded_images(obelics, tokenizer):
    out, rows, images = obelics
    with pytest.raises(ValueError, match="SourceConfig.image_store"):
        TableSource(out / "parquet", "parquet")
    source = TableSource(out / "parquet", "parquet", image_store=out / "images")
    assert source.schema == "obelics" and len(source) == len(rows)
    first = source[0]
    assert [p["type"] for p in first["content"]] == ["text", "image", "text", "image"]
    assert first["content"][2]["text"] == "First paragraph.\n\nSecond."
    assert [first["_image_bytes"][p["image"]] for p in first["content"] if p["type"] == "image"] == \
        [images[rows[0]["images"][1]], images[rows[0]["images"][4]]]
    errors = {i: (source[i].get("_reason"), source[i].get("_error")) for i in range(len(source))
              if source[i]["type"] == "_invalid"}
    assert errors[2] == ("missing_image", "images[1] (https://img.example.com/gone.jpg): not downloaded "
                                          "(failed_to_download)")
    assert errors[3] == ("missing_image", "images[1] (https://img.example.com/never.jpg): not in the image store")
    assert errors[5] == ("bad_record", "the document has no text")
    assert errors[6][1] == "position 0 holds both an image and a text"
    assert "same length" in errors[7][1] and sorted(errors) == [2, 3, 5, 6, 7]
    assert source[4]["content"] == [{"type": "text", "text": "Only words, no images at all."}]
    kept = TableSource(out / "parquet", "parquet", image_store=out / "images", missing_images="drop")
    assert [p["type"] for p in kept[3]["content"]] == ["text", "image", "text"]  # the lost image left out
    assert kept[2]["content"] == [{"type": "text", "text": "Before\n\nafter the lost image."}]
    encoder = SampleEncoder(Processor(tokenizer, ImageProcessor(longest_edge=56, shortest_edge=28), 4),
                            base_dir=source.base_dir)
    sample = encoder(first)
    assert len(sample["images"]) == 2 and sample["targets"].sum() > 0
    with pytest.raises(SampleError, match="not in the image store") as raised:
        encoder(source[3])
    assert raised.value.reason == "missing_image"


def test_obelics_in_a_pipeline_and_through_prepare(obelics, tokenizer, tmp_path, capsys):
    """Missing images counted by reason in training (and raised with strict=True), in `check` and in
    the conversion to ArrayRecord, whose records equal the source's."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from idefics_jax.data.sources import ArrayRecordSource

    out, rows, _ = obelics
    source = dict(format="parquet", image_store=str(out / "images"), **EDGE)
    make = lambda strict: Pipeline([SourceConfig("obelics", str(out / "parquet"), **source)], tokenizer,
                                   PackConfig(seq_len=512, image_slots=8, buckets=((56, 56),)), 2,
                                   image_seq_len=SEQ_LATENTS, seed=3, shard_index=0, shard_count=1, strict=strict)
    pipeline = make(False)
    for _ in range(6):
        next(pipeline)
    assert pipeline.stats["skipped/missing_image"] > 0 and pipeline.stats["skipped/bad_record"] > 0, pipeline.stats
    with pytest.raises(SampleError, match=r"source 'obelics', sample train-00000-of-00001.parquet#\d: "):
        strict = make(True)
        for _ in range(12):
            next(strict)
    with pytest.raises(ValueError, match="missing_images must be one of"):
        SourceConfig("obelics", str(out / "parquet"), format="parquet", missing_images="keep")
    script = Path(__file__).parents[1] / "data" / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare", script)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    tokenizer_path = tmp_path / "tokenizer.model"
    tokenizer_path.write_bytes(tokenizer.sp.serialized_model_proto())
    assert prepare.main(["images", str(out / "images")]) == 0
    assert "webdataset store of 2 files, 12 images, 1 downloads that failed" in capsys.readouterr().out
    assert prepare.main(["check", str(out / "parquet"), "--tokenizer", str(tokenizer_path),
                         "--image-store", str(out / "images")]) == 1
    shown = capsys.readouterr().out
    assert f"{len(rows)} records: 9 usable, bad_record 3, missing_image 2" in shown
    assert "sample 0: train-00000-of-00001.parquet#0 (interleaved): images " in shown and "<image>x64" in shown
    done = subprocess.run([sys.executable, str(script), "array_record", str(out / "parquet"), str(tmp_path / "ar"),
                           "--workers", "1", "--image-store", str(out / "images"), "--missing-images", "drop"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert "11 records kept from 1 files (0 converted before); skipped/bad_record 3" in done.stdout, done.stderr[-3000:]
    converted = ArrayRecordSource(tmp_path / "ar")
    table = TableSource(out / "parquet", "parquet", image_store=out / "images", missing_images="drop")
    expected = [r for r in (table[i] for i in range(len(table))) if r["type"] != "_invalid"]
    for ours, theirs in zip((converted[i] for i in range(len(converted))), expected, strict=True):
        assert ours["content"] == theirs["content"] and ours["_image_bytes"] == theirs["_image_bytes"]
