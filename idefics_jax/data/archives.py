"""Files read a piece at a time, local or gs://.

* Tar shards, WebDataset's layout (PDFA's shards, img2dataset's output): `tar_index(file)` lists a
  shard's members once by sample key and extension (a member's data offset and size);
  `read_member(file, offset, size)` reads one back with a single seek.
* Parquet files, a row group at a time: `RowGroups` keeps the last few decoded, shared by threads.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

log = logging.getLogger(__name__)


def tar_index(file: str) -> dict[str, dict[str, list[int]]]:
    """{sample key: {extension: [data offset, size]}} of a tar shard (WebDataset's naming: the key is
    the member's path up to the first dot of its name). A member cut short is indexed with its size
    beyond the file's end, and read back as an error."""
    samples: dict[str, dict[str, list[int]]] = {}
    with epath.Path(file).open("rb") as handle:
        archive = tarfile.open(fileobj=handle, mode="r:")
        try:
            for member in archive:
                if member.isfile():
                    folder, name = os.path.split(member.name)
                    key, _, ext = name.partition(".")
                    samples.setdefault(os.path.join(folder, key), {})[ext] = [member.offset_data, member.size]
        except (tarfile.ReadError, EOFError, OSError) as error:  # a truncated shard: keep what is whole
            log.warning("%s: read up to a broken member (%s)", file, error)
    return samples


def read_member(file: str, offset: int, size: int, file_size: int, name: str = "member") -> bytes:
    """`size` bytes at `offset` of `file` (`file_size` long); ValueError naming the member (`name`)
    when the shard ends before it does."""
    if offset + size > file_size:
        raise ValueError(f"the {name} is cut short")
    with epath.Path(file).open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


class RowGroups:
    """The last `keep` decoded row groups of Parquet files (a shuffled read still decodes about one
    per row), shared by threads; sent to worker processes empty."""

    def __init__(self, keep: int = 2):
        self.keep, self._tables, self._lock = keep, {}, threading.Lock()

    def get(self, file: str, group: int, columns: Sequence[str] | None = None) -> pa.Table:
        key = (file, group, tuple(columns) if columns else None)
        with self._lock:
            table = self._tables.pop(key, None)
            if table is None:
                with epath.Path(file).open("rb") as handle:
                    table = pq.ParquetFile(handle).read_row_group(group, columns=columns)
            self._tables[key] = table  # most recent last
            while len(self._tables) > self.keep:
                self._tables.pop(next(iter(self._tables)))
        return table

    def __getstate__(self):
        return {"keep": self.keep}

    def __setstate__(self, state):
        self.__init__(state["keep"])
