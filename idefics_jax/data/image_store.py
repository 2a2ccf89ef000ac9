"""Images downloaded by the user, found by their URL: what OBELICS's documents point to.

OBELICS publishes its documents with image URLs; users fetch the images once (img2dataset is the
usual tool) and point the source at what they fetched (`SourceConfig.image_store`). A store is a
directory, local or gs://, of one of these layouts:

* `webdataset`: img2dataset's default output, `NNNNN.tar` shards of `KEY.jpg` (or .png, .webp)
  with `KEY.json` (holding the `url`), each shard with its `NNNNN.parquet` of metadata (`url`,
  `key`, `status`, including the downloads that failed);
* `files`: img2dataset's `files` output, `NNNNN/KEY.jpg` beside `NNNNN.parquet` of metadata;
* `parquet`: Parquet files with a `url` column and an image column (`jpg`, `png`, `webp`, `image`
  or `bytes`; bytes, or `datasets`' `{bytes, path}` struct): img2dataset's `parquet` output, or
  any table of url -> bytes;
* `array_record`: `*.array_record` files of msgpack `{"url": str, "image": bytes}` entries.

The store is indexed once: every URL's 128-bit hash (blake2b), sorted, with where its image lies
(shard, and a member's offset and size, a file's key, or a row), about 36 bytes per image in
`STORE/url_index/` (numpy files, memory-mapped: 353M OBELICS images are 13 GB on disk and a lookup
reads a few pages), rebuilt when the store's shards change. A URL whose download failed is indexed
with its img2dataset status, so that a missing image is reported as "not downloaded (status)" or
"not in the store". Tar members and files are one read each; a Parquet store decodes a row group
per lookup (the last two cached), which suits sequential conversion, not shuffled training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from typing import Any, Iterator

import grain
import msgpack
import numpy as np
import pyarrow.parquet as pq
from etils import epath

from idefics_jax.data.archives import RowGroups, read_member, tar_index
from idefics_jax.paths import is_url

log = logging.getLogger(__name__)

LAYOUTS = ("webdataset", "files", "parquet", "array_record")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, in this order
IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "bytes")  # a Parquet store's image column, in this order
INDEX = "url_index"
FIELDS = ("h1", "h2", "shard", "a", "b")  # hash halves; shard (-1: failed download); two numbers of the place
DTYPES = {"h1": np.uint64, "h2": np.uint64, "shard": np.int32, "a": np.int64, "b": np.int64}


class MissingImage(LookupError):
    """A URL whose image the store does not hold; the message says why."""


def url_hash(url: str) -> tuple[int, int]:
    """A URL's 128-bit blake2b hash as two 64-bit halves (the index's sort key)."""
    digest = hashlib.blake2b(url.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def _layout(root: epath.Path) -> tuple[str, list[str], str | None]:
    """(the store's layout, its shard files in name order, a Parquet store's image column)."""
    if not root.is_dir():
        raise FileNotFoundError(f"No image store at {root} (SourceConfig.image_store: a directory of img2dataset "
                                f"output, Parquet or ArrayRecord files)")
    for ext, layout in (("array_record", "array_record"), ("tar", "webdataset")):
        files = sorted(str(f) for f in root.glob(f"*.{ext}"))
        if files:
            return layout, files, None
    files = sorted(str(f) for f in root.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root} holds no .tar, .parquet or .array_record files: not an image store")
    with epath.Path(files[0]).open("rb") as handle:
        columns = pq.read_schema(handle).names
    if "url" not in columns:
        raise ValueError(f"{files[0]}: an image store's Parquet files have a `url` column (columns: {columns})")
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    return ("parquet" if image_column else "files"), files, image_column


def _metadata(parquet_file: str) -> Iterator[tuple[str, str, str]]:
    """(url, key, status) of each row of an img2dataset metadata file."""
    with epath.Path(parquet_file).open("rb") as handle:
        table = pq.read_table(handle, columns=["url", "key", "status"])
    yield from zip(*(table.column(c).to_pylist() for c in ("url", "key", "status")))


class ImageStore:
    """Image bytes by URL (see the module's doc). `get(url)` returns the bytes or raises `MissingImage`."""

    def __init__(self, path: str | os.PathLike):
        self.root = epath.Path(path)
        self.layout, self.files, self._image_column = _layout(self.root)
        self.sizes = [epath.Path(f).stat().length for f in self.files]
        self._lock = threading.Lock()
        self._index: dict[str, np.ndarray] | None = None
        self._in_memory = False  # the index could not be written beside the store
        self._meta = self._load_meta()
        if self._meta is None:
            self._build()
        self.statuses: list[str] = self._meta["statuses"]
        self._groups = RowGroups(keep=2)  # a Parquet store's
        self._records = None

    # -- the index ---------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {"layout": self.layout, "files": [os.path.basename(f) for f in self.files], "sizes": self.sizes}

    def _load_meta(self) -> dict | None:
        meta = self.root / INDEX / "meta.json"
        if not meta.exists():
            return None
        saved = json.loads(meta.read_text())
        if {k: saved.get(k) for k in ("layout", "files", "sizes")} != self._fingerprint():
            log.info("%s: the store's files changed since it was indexed; indexing again", self.root)
            return None
        return saved

    def _entries(self, s: int) -> Iterator[tuple[str, int, int, str]]:
        """(url, a, b, status) of every image shard `s` lists, downloaded or not."""
        file = self.files[s]
        if self.layout == "webdataset":
            members = tar_index(file)
            metadata = os.path.splitext(file)[0] + ".parquet"
            if epath.Path(metadata).exists():
                rows = _metadata(metadata)
            else:  # no metadata file: each sample's json names its url
                rows = ((json.loads(read_member(file, *m["json"], self.sizes[s]))["url"], key, "success")
                        for key, m in members.items() if "json" in m)
            for url, key, status in rows:
                sample = members.get(key, {})
                image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if status == "success" and image is None:
                    status = "missing from its shard"
                yield url, *(image or (0, 0)), status
        elif self.layout == "files":  # a: the key as a number; b: its width in digits * 8 + the extension's place
            folder = self.root / os.path.splitext(os.path.basename(file))[0]
            for url, key, status in _metadata(file):
                ext = next((i for i, e in enumerate(IMAGE_EXTENSIONS) if (folder / f"{key}.{e}").exists()), -1) \
                    if status == "success" else -1
                if status == "success" and ext < 0:
                    status = "missing from its folder"
                yield url, int(key), len(key) * 8 + max(ext, 0), status
        elif self.layout == "parquet":  # a: the row group; b: the row in it
            with epath.Path(file).open("rb") as handle:
                table = pq.ParquetFile(handle)
                for g in range(table.metadata.num_row_groups):
                    for row, url in enumerate(table.read_row_group(g, columns=["url"]).column("url").to_pylist()):
                        yield url, g, row, "success"
        else:  # a: the entry
            source = grain.sources.ArrayRecordDataSource([file])
            for i in range(len(source)):
                yield msgpack.unpackb(source[i], raw=False)["url"], i, 0, "success"

    def _build(self):
        """Indexes every shard: a shard's entries as numpy arrays, then all of them sorted by hash (a
        failed download after a downloaded copy of the same URL). Holds about 2.5x the index in memory."""
        statuses, parts = ["success"], []
        for s in range(len(self.files)):
            rows = []
            for url, a, b, status in self._entries(s):
                if not isinstance(url, str):
                    continue
                if status != "success":
                    statuses += [status] if status not in statuses else []
                    rows.append((*url_hash(url), -1, statuses.index(status), 0))
                else:
                    rows.append((*url_hash(url), s, a, b))
            parts.append({f: np.asarray([r[k] for r in rows], DTYPES[f]) for k, f in enumerate(FIELDS)})
            log.info("%s: indexed %s (%d of %d shards)", self.root, os.path.basename(self.files[s]), s + 1, len(self.files))
        arrays = {f: np.concatenate([p[f] for p in parts]) if parts else np.zeros(0, DTYPES[f]) for f in FIELDS}
        order = np.lexsort((arrays["shard"] < 0, arrays["h2"], arrays["h1"]))
        self._index = {f: a[order] for f, a in arrays.items()}
        self._meta = {**self._fingerprint(), "statuses": statuses, "images": int((self._index["shard"] >= 0).sum()),
                      "failed": int((self._index["shard"] < 0).sum())}
        self._in_memory = not self._save()

    def _save(self) -> bool:
        """Writes the index beside the store (into a temporary directory, then renamed); False where
        the store is read-only (the index is then kept in this process's memory)."""
        target = self.root / INDEX
        partial = self.root / f"{INDEX}.partial-{os.getpid()}"
        try:
            partial.mkdir(parents=True, exist_ok=True)
            for field, array in self._index.items():
                with (partial / f"{field}.npy").open("wb") as f:
                    np.save(f, array)
            (partial / "meta.json").write_text(json.dumps(self._meta))
            if target.exists():
                target.rmtree()
            partial.rename(target)
            return True
        except OSError as error:
            log.warning("%s: cannot write the URL index beside the store (%s); it is kept in memory", self.root, error)
            return False

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._index is None:
            folder = self.root / INDEX
            load = (lambda f: np.load(str(folder / f"{f}.npy"), mmap_mode="r")) if not is_url(self.root) else \
                (lambda f: np.load(io.BytesIO((folder / f"{f}.npy").read_bytes())))
            self._index = {f: load(f) for f in FIELDS}
        return self._index

    def __len__(self) -> int:
        """The images the store holds."""
        return self._meta["images"]

    @property
    def failed(self) -> int:
        """The URLs the store lists whose download failed."""
        return self._meta["failed"]

    # -- lookups -----------------------------------------------------------------------------
    def locate(self, url: str) -> tuple[int, int, int]:
        """(shard, a, b) of the URL's image; `MissingImage` saying why there is none."""
        index, (h1, h2) = self._arrays(), url_hash(url)
        lo, hi = np.searchsorted(index["h1"], np.uint64(h1), "left"), np.searchsorted(index["h1"], np.uint64(h1), "right")
        for i in range(lo, hi):
            if int(index["h2"][i]) == h2:
                shard, a, b = int(index["shard"][i]), int(index["a"][i]), int(index["b"][i])
                if shard < 0:
                    raise MissingImage(f"not downloaded ({self.statuses[a]})")
                return shard, a, b
        raise MissingImage("not in the image store")

    def get(self, url: str) -> bytes:
        shard, a, b = self.locate(url)
        file = self.files[shard]
        try:
            if self.layout == "webdataset":
                return read_member(file, a, b, self.sizes[shard], "image member")
            if self.layout == "files":
                folder, (width, ext) = os.path.splitext(os.path.basename(file))[0], divmod(b, 8)
                return (self.root / folder / f"{a:0{width}d}.{IMAGE_EXTENSIONS[ext]}").read_bytes()
            if self.layout == "parquet":
                return self._parquet_image(shard, a, b)
            with self._lock:
                if self._records is None:
                    self._records = [grain.sources.ArrayRecordDataSource([f]) for f in self.files]
            return msgpack.unpackb(self._records[shard][a], raw=False)["image"]
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
            raise MissingImage(f"unreadable in the store ({type(error).__name__}: {error})") from error

    def _parquet_image(self, shard: int, group: int, row: int) -> bytes:
        value = self._groups.get(self.files[shard], group, [self._image_column]).column(0)[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError("its row holds no image bytes")
        return bytes(data)

    def __getstate__(self):  # for worker processes: the index is mapped again, tables read again
        state = dict(self.__dict__)
        mapped = not is_url(self.root) and not self._in_memory
        state.update(_lock=None, _records=None, _index=None if mapped else self._index)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"ImageStore({self.root}, {self.layout}, {len(self)} images, {self.failed} failed)"
