"""Tar shards read a member at a time: WebDataset's layout (PDFA's shards, img2dataset's output).

`tar_index(file)` lists a shard's members once by sample key and extension (a member's data offset
and size); `read_member(file, offset, size)` reads one back with a single seek, local or gs://.
"""

from __future__ import annotations

import logging
import os
import tarfile

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
