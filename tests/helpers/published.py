"""Files in the published datasets' exact schemas, made in the tests: The Cauldron / Docmatix rows
(Parquet, Arrow), PDFA's WebDataset shards (a PDF and its OCR json per sample), OBELICS rows and
the image stores img2dataset writes for them."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# The Cauldron's (and Docmatix's) features, as the Hub's Parquet files carry them
CAULDRON = pa.schema([
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))),
])


def encoded(rng, fmt: str) -> bytes:
    h, w = (int(x) for x in rng.integers(20, 70, 2))
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def cauldron_rows(rng, n: int):
    """(rows, how many are good): Q/A rows of 1-3 turns on 0-2 images (PNG and JPEG), and the bad
    rows a download may hold, each of a kind."""
    words = ["red", "blue", "cat", "boat", "seven", "tree", "house", "green"]
    say = lambda k: " ".join(rng.choice(words, k))
    rows = []
    for i in range(n):
        images = [{"bytes": encoded(rng, ["PNG", "JPEG"][j % 2]), "path": None} for j in range(int(rng.integers(0, 3)))]
        texts = [{"user": f"Question {t}: {say(3)}?", "assistant": say(2), "source": "vqav2"}
                 for t in range(int(rng.integers(1, 4)))]
        rows.append({"images": images, "texts": texts})
    bad = [
        {"images": [{"bytes": b"not an image", "path": None}], "texts": [{"user": "What?", "assistant": "x", "source": "s"}]},
        {"images": [{"bytes": encoded(rng, "PNG"), "path": None}], "texts": []},
        {"images": [], "texts": [{"user": None, "assistant": "x", "source": "s"}]},
        {"images": [{"bytes": None, "path": "lost.png"}], "texts": [{"user": "What?", "assistant": "x", "source": "s"}]},
        {"images": [], "texts": [{"user": "What?", "assistant": "", "source": "s"}]},
    ]
    for k, row in enumerate(bad):
        rows.insert(3 * k + 2, row)
    return rows, n


def pdf_of(pages: int, rng) -> bytes:
    """A PDF of `pages` pages, each an image (PIL writes it)."""
    images = [Image.fromarray(rng.integers(0, 255, (int(rng.integers(60, 120)), int(rng.integers(60, 120)), 3),
                                           dtype=np.uint8)) for _ in range(pages)]
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return out.getvalue()


def pdfa_ocr(texts: list[list[str]]) -> bytes:
    """PDFA's OCR json: per page its lines (and words) with boxes and scores."""
    page = lambda lines: {"lines": {"text": lines, "bbox": [[0.1, 0.1, 0.5, 0.2]] * len(lines),
                                    "score": [0.9] * len(lines)},
                          "words": {"text": " ".join(lines).split(), "bbox": [], "score": []},
                          "images_bbox": [], "images_bbox_no_text_overlap": []}
    return json.dumps({"pages": [page(lines) for lines in texts]}).encode()


def write_tar(path, members: list[tuple[str, bytes]], cut: bool = False):
    """A tar shard of `members`; `cut`: the file ends halfway through the last member (a download
    that stopped)."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            last = archive.offset - tarfile.BLOCKSIZE * -(-len(data) // tarfile.BLOCKSIZE)  # its data's start
    if cut:
        path.write_bytes(path.read_bytes()[:last + len(members[-1][1]) // 2])


# OBELICS's features, as the Hub's Parquet files carry them
OBELICS = pa.schema([("images", pa.list_(pa.string())), ("metadata", pa.string()),
                     ("general_metadata", pa.string()), ("texts", pa.list_(pa.string()))])
# img2dataset's metadata file beside each shard (the columns the store reads, and some it does not)
IMG2DATASET_METADATA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                                  ("status", pa.string()), ("error_message", pa.string()),
                                  ("width", pa.int64()), ("height", pa.int64())])


def obelics_row(parts: list[tuple[str, str]]) -> dict:
    """An OBELICS row of ("image", url) and ("text", paragraph) parts, aligned as published."""
    images = [value if kind == "image" else None for kind, value in parts]
    texts = [value if kind == "text" else None for kind, value in parts]
    metadata = json.dumps([{"document_url": "https://example.org/a", "unformatted_src": u, "src": u,
                            "formatted_filename": "x", "alt_text": "", "original_width": 64, "original_height": 48}
                           if u else None for u in images])
    return {"images": images, "metadata": metadata,
            "general_metadata": json.dumps({"url": "https://example.org/a", "warc_filename": "w", "warc_record_offset": 0,
                                            "warc_record_length": 1}),
            "texts": texts}


def img2dataset_store(root, layout: str, images: dict[str, bytes], failed: list[str], shards: int = 2):
    """The images (url -> bytes) as img2dataset writes them with `output_format=layout` (webdataset,
    files or parquet), `shards` shards of 9-digit keys, the `failed` URLs listed in the metadata with
    a failed status (in the first shard); the last webdataset shard has no metadata file (its samples'
    json names the url)."""
    root.mkdir(parents=True, exist_ok=True)
    items = [(url, None, "failed_to_download") for url in failed] + [(url, data, "success")
                                                                        for url, data in images.items()]
    for s in range(shards):
        rows, members = [], []
        for k, (url, data, status) in enumerate(items[s::shards]):
            key = f"{s:05d}{k:04d}"
            rows.append({"url": url, "caption": "", "key": key, "status": status,
                         "error_message": None if data else "HTTP Error 404: Not Found", "width": 64, "height": 48})
            if data is None:
                continue
            ext = "png" if data[:4] == b"\x89PNG" else "jpg"
            meta = json.dumps({"url": url, "key": key, "status": status}).encode()
            if layout == "webdataset":
                members += [(f"{key}.{ext}", data), (f"{key}.txt", b""), (f"{key}.json", meta)]
            elif layout == "files":
                (root / f"{s:05d}").mkdir(exist_ok=True)
                (root / f"{s:05d}" / f"{key}.{ext}").write_bytes(data)
                (root / f"{s:05d}" / f"{key}.json").write_bytes(meta)
            else:
                rows[-1]["jpg"] = data
        if layout == "webdataset":
            write_tar(root / f"{s:05d}.tar", members)
        if layout == "parquet":
            table = pa.Table.from_pylist([r for r in rows if "jpg" in r],
                                         schema=IMG2DATASET_METADATA.append(pa.field("jpg", pa.binary())))
        else:
            table = pa.Table.from_pylist(rows, schema=IMG2DATASET_METADATA)
        if not (layout == "webdataset" and s == shards - 1):
            pq.write_table(table, root / f"{s:05d}.parquet", row_group_size=2)
        (root / f"{s:05d}_stats.json").write_text("{}")
