"""On-disk formats of a source, each a random-access data source that Grain reads.

* `jsonl`: `DIR/data.jsonl`, one record per line (see `samples.py`), images as files under DIR.
  Line offsets are indexed once, so any record is one seek away.
* `array_record`: `DIR/*.array_record`; each entry is msgpack `{"record": json, "images": {ref: bytes}}`,
  images embedded (the format for scale: sharded files, no small-file reads).
* `tfds`: a TensorFlow Datasets build of the same records (`idefics_jax.data.tfds_builder`),
  read through `builder.as_data_source()`; TensorFlow is not needed.
* `parquet` / `arrow`: published datasets as distributed, a file or a directory of `*.parquet`
  files (the Hub's) or `*.arrow` files (the `datasets` library's cache), each row adapted to a
  record by its schema (`schemas.py`: The Cauldron, Docmatix, OBELICS with its images from an
  `image_store.py` store, image-caption pairs, or our own records), told from the columns unless
  the source names it. Parquet is read a row group at a time (the last few decoded
  row groups cached), Arrow memory-mapped; for shuffled training at scale, convert to ArrayRecord.
* `webdataset`: tar shards indexed once (`archives.py`): PDFA's samples (a record per page) or
  caption pairs.

`write_array_record(dir, records, base_dir)` converts records (with image files) to ArrayRecord.

A source may live in a Cloud Storage bucket (`gs://bucket/data/pairs`): ArrayRecord files are read
with a ranged request per record (array_record's own Cloud Storage reader), a TFDS build likewise,
and a jsonl file is read into memory once (its images, as files, one request each), all through
`etils.epath` (gcsfs) and the host's Google credentials.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import threading
from typing import Any, Iterable

import grain
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from PIL import Image

from idefics_jax.data.archives import RowGroups, read_member, tar_index
from idefics_jax.data.image_store import ImageStore
from idefics_jax.data.schemas import (MISSING_IMAGES, SCHEMAS, SchemaError, detect_schema, pair_columns, pdfa_pages,
                                      pdfa_record, to_record)
from idefics_jax.paths import is_url

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "array_record", "tfds", "parquet", "arrow", "webdataset")


def invalid(where: str, error: str, reason: str = "bad_record") -> dict[str, Any]:
    """The record that stands for one that cannot be read (the encoder skips it, counted by `reason`)."""
    return {"type": "_invalid", "id": where, "_at": where, "_error": error, "_reason": reason}


class JsonlSource:
    """Records of `DIR/data.jsonl` (or a given .jsonl file), by index."""

    def __init__(self, path: str | os.PathLike):
        path = epath.Path(path)
        self.file = path / "data.jsonl" if path.is_dir() else path
        if not self.file.exists():
            raise FileNotFoundError(f"No jsonl data at {self.file}")
        self.base_dir = str(self.file.parent)
        # a local file is read a line at a time, by seeking; one in a bucket is held in memory (a
        # ranged read per line would cost a request each, gcsfs's read-ahead megabytes each)
        self._text = self.file.read_bytes() if is_url(self.file) else None
        offsets = [0]
        with io.BytesIO(self._text) if self._text is not None else self.file.open("rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        ends = np.asarray(offsets, np.int64)
        keep = [i for i in range(len(ends) - 1) if ends[i + 1] - ends[i] > 1]  # skip blank lines
        self._starts, self._ends = ends[:-1][keep], ends[1:][keep]
        self._lines = np.asarray(keep, np.int64) + 1

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = int(self._starts[index]), int(self._ends[index])
        if self._text is not None:
            line = self._text[start:end]
        else:
            with open(self.file, "rb") as f:
                f.seek(start)
                line = f.read(end - start)
        where = f"{self.file.name}:{int(self._lines[index])}"  # the line number, for messages
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return invalid(where, f"invalid JSON: {error}")
        if not isinstance(record, dict):
            return invalid(where, f"a JSON {type(record).__name__}, not an object")
        record["_at"] = where
        return record

    def __repr__(self):
        return f"JsonlSource({self.file}, {len(self)} records)"


def decode_entry(data: bytes, where: str = "") -> dict[str, Any]:
    """An ArrayRecord / TFDS entry -> its record, images under `_image_bytes` (`invalid(...)` when
    the entry cannot be decoded); `where` names it in messages."""
    try:
        entry = msgpack.unpackb(data, raw=False)
        record = json.loads(entry["record"])
        images = entry.get("images") or {}
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as error:
        return invalid(where, f"undecodable entry ({type(error).__name__}: {error})")
    if not isinstance(record, dict) or not isinstance(images, dict):
        return invalid(where, "an entry whose record or images are not a map")
    record["_image_bytes"], record["_at"] = images, where
    return record


def encode_entry(record: dict[str, Any], images: dict[str, bytes]) -> bytes:
    """The entry of a record (its private `_` keys left out) and its images' bytes."""
    record = {key: value for key, value in record.items() if not key.startswith("_")}
    return msgpack.packb({"record": json.dumps(record), "images": images}, use_bin_type=True)


class ArrayRecordSource:
    """Records of `DIR/*.array_record`, images embedded."""

    def __init__(self, path: str | os.PathLike):
        path = epath.Path(path)
        files = sorted(path.glob("*.array_record")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"No .array_record files at {path}")
        self._source = grain.sources.ArrayRecordDataSource([str(f) for f in files])  # gs:// read natively
        self.base_dir = str(path)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_entry(self._source[index], f"{self.base_dir}#{index}")

    def __repr__(self):
        return f"ArrayRecordSource({self.base_dir}, {len(self)} records)"


class TfdsSource:
    """Records of a TFDS build made by `idefics_jax.data.tfds_builder`."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self._source = load_data_source(path, split)
        self.base_dir = str(path)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_entry(bytes(self._source[index]["entry"]), f"{self.base_dir}#{index}")


def load_data_source(data_dir: str | os.PathLike, split: str = "train"):
    """Random access to a build made by `build` (the directory given to it, or the versioned one)."""
    import tensorflow_datasets as tfds  # heavy, and needed only for TFDS builds

    data_dir = epath.Path(data_dir)  # local, or gs:// (TFDS reads through epath, the files through array_record)
    candidates = [data_dir] if (data_dir / "dataset_info.json").exists() else \
        sorted(p.parent for p in data_dir.glob("*/*/dataset_info.json"))
    if not candidates:
        raise FileNotFoundError(f"No TFDS build under {data_dir} (expected */<version>/dataset_info.json)")
    return tfds.builder_from_directory(str(candidates[-1])).as_data_source(split=split)


def files_at(path: str | os.PathLike, ext: str) -> tuple[list[str], str]:
    """(the `.ext` files at `path`, in name order; their directory): a file, a directory of them, or a
    directory of directories of them (The Cauldron's subsets: `the_cauldron/ai2d/train-*.parquet`)."""
    path = epath.Path(path)
    files = (sorted(path.glob(f"*.{ext}")) or sorted(path.glob(f"*/*.{ext}"))) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"No .{ext} files at {path} (nor in its subdirectories)")
    return [str(f) for f in files], str(path if path.is_dir() else path.parent)


def file_name(file: str, base_dir: str) -> str:
    """A source's file as messages name it: its path under the source's directory."""
    return os.path.relpath(file, base_dir) if not is_url(file) else file[len(base_dir.rstrip("/")) + 1:]


class TableSource:
    """Rows of Parquet or Arrow files (`fmt`), a file or a directory of them, local or gs://, each
    adapted to a record by `schema` (default: told from the columns). A row that cannot be read or
    does not fit its schema comes back as `invalid(...)`, named by its file and row."""


    def __init__(self, path: str | os.PathLike, fmt: str, schema: str = "", image_column: str = "",
                 text_column: str = "", image_store: str | os.PathLike = "", missing_images: str = "skip"):
        if fmt not in ("parquet", "arrow"):
            raise ValueError(f"TableSource reads parquet or arrow files, not '{fmt}'")
        path = epath.Path(path)
        self.fmt, (self.files, self.base_dir) = fmt, files_at(path, fmt)
        self._lock = threading.Lock()
        self._tables: dict[int, pa.Table] = {}  # Arrow: file -> its mapped table
        self._row_groups = RowGroups(keep=2)  # Parquet
        self._groups, ends, names = [], [], None  # (file, row group or None), cumulative row counts
        self._file_starts = []  # the index of each file's first row
        for f, file in enumerate(self.files):
            self._file_starts.append(ends[-1] if ends else 0)
            if fmt == "parquet":
                with epath.Path(file).open("rb") as handle:
                    meta = pq.ParquetFile(handle).metadata
                    columns = meta.schema.to_arrow_schema().names
                    sizes = [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            else:
                table = self._arrow(f)
                columns, sizes = table.column_names, [(None, table.num_rows)]
            names = names or columns
            if columns != names:
                raise ValueError(f"{file} has columns {columns}, unlike {self.files[0]}'s {names}")
            for group, rows in sizes:
                self._groups.append((f, group))
                ends.append((ends[-1] if ends else 0) + rows)
        self._ends = ends
        self.schema = schema or ("pairs" if image_column or text_column else detect_schema(names))
        if self.schema not in SCHEMAS:
            raise ValueError(f"{path}: columns {names} fit no known schema; name one of {SCHEMAS} (SourceConfig.schema)"
                             if not schema else f"Unknown schema '{schema}'; choose one of {SCHEMAS}")
        if self.schema == "pdfa":
            raise ValueError("PDFA is read from its WebDataset tar shards (format 'webdataset')")
        self.options = pair_columns(names, image_column, text_column) if self.schema == "pairs" else {}
        if self.schema == "obelics":
            if not image_store:
                raise ValueError(f"{path}: OBELICS rows name their images by URL; give the directory of the "
                                 f"downloaded images (SourceConfig.image_store, see data/image_store.py)")
            if missing_images not in MISSING_IMAGES:
                raise ValueError(f"missing_images must be one of {MISSING_IMAGES}, not '{missing_images}'")
            self.options = {"image_store": ImageStore(image_store), "missing_images": missing_images}

    def _arrow(self, f: int) -> pa.Table:
        """The Arrow file's table, memory-mapped (a bucket's is read into memory), IPC file or stream."""
        if f not in self._tables:
            file = self.files[f]
            source = pa.BufferReader(epath.Path(file).read_bytes()) if is_url(file) else pa.memory_map(file)
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()  # what `datasets` writes
            self._tables[f] = table
        return self._tables[f]

    def _group(self, g: int) -> pa.Table:
        f, group = self._groups[g]
        if group is None:
            with self._lock:
                return self._arrow(f)
        return self._row_groups.get(self.files[f], group)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = bisect.bisect_right(self._ends, index)
        start = self._ends[g - 1] if g else 0
        f = self._groups[g][0]
        where = f"{file_name(self.files[f], self.base_dir)}#{index - self._file_starts[f]}"  # the row in its file
        try:
            table = self._group(g)
            row = table.slice(index - start, 1).to_pylist()[0]
        except (OSError, pa.ArrowException) as error:
            return invalid(where, f"unreadable row ({type(error).__name__}: {error})")
        try:
            record = to_record(self.schema, row, where, self.options)
        except SchemaError as error:
            return invalid(where, str(error), error.reason)
        record["_at"] = where
        return record

    def __getstate__(self):  # for worker processes: handles and cached tables are not sent
        state = dict(self.__dict__)
        state["_tables"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"TableSource({self.base_dir}, {self.fmt}, {self.schema}, {len(self)} rows)"


class TarSource:
    """WebDataset tar shards, local or gs://, each indexed once (`tar_index`; the index kept beside a
    local shard and rebuilt when the shard's size changes), then read a member at a time. `schema`:
    `pdfa` (a record per page, rendered at `dpi`) or `pairs` (an image and a caption member, by
    extension), told from the first sample's extensions unless given."""

    def __init__(self, path: str | os.PathLike, schema: str = "", dpi: int = 150, image_column: str = "",
                 text_column: str = ""):
        path = epath.Path(path)
        (self.files, self.base_dir), self.dpi = files_at(path, "tar"), dpi
        self._sizes = [epath.Path(f).stat().length for f in self.files]
        self._samples = [self._indexed(f, size) for f, size in zip(self.files, self._sizes)]
        first = next((members for shard in self._samples for members in shard.values()), {})
        self.schema = schema or ("pairs" if image_column or text_column else detect_schema(first))
        if self.schema not in ("pdfa", "pairs"):
            raise ValueError(f"{path}: samples of {sorted(first)} fit no known schema; name pdfa or pairs "
                             f"(SourceConfig.schema)" if not schema else
                             f"A webdataset source is read as pdfa or pairs, not '{schema}'")
        self.columns = pair_columns(first, image_column, text_column) if self.schema == "pairs" else {}
        self._entries = []  # (shard, key, page)
        for f, shard in enumerate(self._samples):
            for key, members in shard.items():
                pages = self._pages(f, members) if self.schema == "pdfa" else 1
                self._entries.extend((f, key, page) for page in range(pages))

    @staticmethod
    def _indexed(file: str, size: int) -> dict[str, dict[str, list[int]]]:
        cached = epath.Path(file + ".index.json")
        if not is_url(file) and cached.exists():
            saved = json.loads(cached.read_text())
            if saved.get("size") == size:
                return saved["samples"]
        samples = tar_index(file)
        if not is_url(file):
            try:
                cached.write_text(json.dumps({"size": size, "samples": samples}))
            except OSError:  # a read-only directory: indexed again next time
                pass
        return samples

    def _pages(self, f: int, members: dict) -> int:
        """A PDFA sample's page count, from its OCR json (1 for a sample that cannot be read: its
        record says why)."""
        try:
            return max(1, len(pdfa_pages(self._read(f, members, "json"))))
        except (SchemaError, KeyError, ValueError):
            return 1

    def _read(self, f: int, members: dict, ext: str) -> bytes:
        if ext not in members:
            raise KeyError(ext)
        return read_member(self.files[f], *members[ext], self._sizes[f], f".{ext} member")

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        f, key, page = self._entries[index]
        members = self._samples[f][key]
        where = f"{file_name(self.files[f], self.base_dir)}:{key}" + (f"#page{page}" if self.schema == "pdfa" else "")
        try:
            if self.schema == "pdfa":
                sample = {ext: self._read(f, members, ext) for ext in ("pdf", "json")}
                record = pdfa_record(sample, where, page, self.dpi)
            else:
                image, text = self.columns["image"], self.columns["text"]
                row = {image: self._read(f, members, image), text: self._read(f, members, text).decode("utf-8")}
                record = to_record("pairs", row, where, self.columns)
        except KeyError as error:
            return invalid(where, f"the sample has no .{error.args[0]} member")
        except (SchemaError, ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
            return invalid(where, str(error))
        record["_at"] = where
        return record

    def __repr__(self):
        return f"TarSource({self.base_dir}, {self.schema}, {len(self)} samples)"


def open_source(path: str | os.PathLike, fmt: str, *, schema: str = "", image_column: str = "", text_column: str = "",
                dpi: int = 150, image_store: str | os.PathLike = "", missing_images: str = "skip"):
    """The source of `fmt` at `path`; the keywords apply to the published formats (`schemas.py`)."""
    if fmt == "webdataset":
        return TarSource(path, schema, dpi, image_column, text_column)
    if fmt in ("parquet", "arrow"):
        return TableSource(path, fmt, schema, image_column, text_column, image_store, missing_images)
    if schema not in ("", "records"):
        raise ValueError(f"A {fmt} source holds our records; schema '{schema}' is for parquet or arrow files")
    if fmt == "jsonl":
        return JsonlSource(path)
    if fmt == "array_record":
        return ArrayRecordSource(path)
    if fmt == "tfds":
        return TfdsSource(path)
    raise ValueError(f"Unknown source format '{fmt}'; choose one of {FORMATS}")


def image_refs(record: dict[str, Any]) -> list[str]:
    """The image references a record names (of a malformed record, those that can be found: the
    encoder reports what is wrong with it)."""
    kind = record.get("type")
    if kind in ("pair", "document"):
        refs = [record.get("image")]
    elif kind == "interleaved":
        content = record.get("content")
        refs = [p.get("image") for p in content if isinstance(p, dict) and p.get("type") == "image"] \
            if isinstance(content, list) else []
    elif kind == "conversation":
        refs = record.get("images") if isinstance(record.get("images"), list) else []
    else:
        refs = []
    return [ref for ref in refs if isinstance(ref, str)]


def records_with_images(records: Iterable[dict], base_dir: str | os.PathLike):
    """(record, {ref: bytes}) with every referenced image file read (missing files stay out); a
    record that could not be read (`invalid`) is left out with a warning naming it."""
    for record in records:
        if record.get("type") == "_invalid":
            log.warning("Left out %s: %s", record["_at"], record["_error"])
            continue
        yield record, record_images(record, base_dir)


def record_images(record: dict, base_dir: str | os.PathLike) -> dict[str, bytes]:
    """A record's images as encoded bytes: those it embeds (a decoded image, such as a page rendered
    from a PDF, encoded as PNG), then the files it names under `base_dir` (missing ones left out)."""
    images = {}
    for ref, image in (record.get("_image_bytes") or {}).items():
        if isinstance(image, Image.Image):
            out = io.BytesIO()
            image.save(out, format="PNG")
            image = out.getvalue()
        images[ref] = image
    for ref in image_refs(record):
        path = epath.Path(base_dir) / ref
        if ref not in images and path.exists():
            images[ref] = path.read_bytes()
    return images


def write_array_record(out_dir: str | os.PathLike, records: Iterable[dict], base_dir: str | os.PathLike,
                       num_shards: int = 1) -> list[str]:
    """Writes records (images embedded) into `num_shards` ArrayRecord files of consecutive records,
    so that the files read in name order give the records in their original order."""
    records = list(records)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"data-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:]):
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for record, images in records_with_images(records[start:stop], base_dir):
                writer.write(encode_entry(record, images))
        finally:
            writer.close()
    return paths
