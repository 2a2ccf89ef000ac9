"""Directories that are local paths or Cloud Storage URLs (`gs://bucket/run`).

A training workdir may be a bucket: it is the one directory every host of a TPU pod sees, and
it outlives the VMs. Orbax writes checkpoints there natively (arrays through tensorstore, the
rest through `etils.epath`); metrics, TensorBoard events, the run's config and its tokenizer go
through `epath` as well. So may the training data (`config.data.dir`, `evaluate --data`):
ArrayRecord files and TFDS builds are read a record at a time by array_record's own Cloud Storage
reader, jsonl files and image files through `epath`. So may checkpoints: converted ones (orbax) are
read and written natively; Hugging Face safetensors are fetched a shard at a time to a temporary
file (safetensors reads local files only) and written likewise. `gs://` needs `gcsfs`
(`pip install "idefics_jax[gcs]"`) and the host's Google credentials (a TPU VM has them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from typing import Iterator

from etils import epath

log = logging.getLogger(__name__)

URL_SCHEMES = ("gs",)  # what is tested (against a local GCS emulator); s3:// etc. are refused
_FOUND_BUCKETS: set[str] = set()  # buckets this process has reached: each is looked up once


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def as_path(path: str | os.PathLike, what: str = "--workdir") -> epath.Path:
    """An absolute local path, or a `gs://` URL checked to be reachable (the bucket exists and this
    host may list it). Raises ValueError (an unsupported scheme, gcsfs missing, a bucket out of reach) or
    FileNotFoundError (no such bucket), with the remedy named."""
    text = str(path)
    if not is_url(text):
        return epath.Path(os.path.abspath(text))
    scheme, _, rest = text.partition("://")
    if scheme not in URL_SCHEMES or not rest.strip("/"):
        raise ValueError(f"{what} {text}: only local paths and gs://bucket/... URLs are supported (for another "
                         f"store, mount it on every host and pass its path)")
    try:
        import gcsfs  # noqa: F401 - epath's gs:// backend
    except ImportError as error:
        raise ValueError(f"{what} {text}: gs:// paths need gcsfs (pip install 'idefics_jax[gcs]')") from error
    bucket = epath.Path(f"gs://{rest.split('/')[0]}")
    if str(bucket) in _FOUND_BUCKETS:  # every path of a run comes through here: one request, not one per path
        return epath.Path(text)
    try:
        exists = bucket.exists()
    except Exception as error:  # noqa: BLE001 - credentials, network: name the bucket and the cause
        raise ValueError(f"{what} {text}: cannot reach bucket {bucket} ({type(error).__name__}: {error}); "
                         f"check this host's Google credentials") from error
    if not exists:
        raise FileNotFoundError(f"{what} {text}: bucket {bucket} does not exist (create it first: "
                                f"gcloud storage buckets create {bucket})")
    _FOUND_BUCKETS.add(str(bucket))
    return epath.Path(text)


def upload_tree(local: str | os.PathLike, remote: epath.Path, sent: dict[str, tuple[int, int]] | None = None) -> None:
    """Copies the files under the local directory `local` to `remote`, keeping their relative paths.
    `sent` (relative path -> (size, mtime_ns) when last copied): only files changed since are
    copied, and it is brought up to date."""
    sent = {} if sent is None else sent
    for root, _, files in os.walk(local):
        for name in sorted(files):
            source = os.path.join(root, name)
            stat = os.stat(source)  # before reading: a file that grows meanwhile is sent again next time
            relative = os.path.relpath(source, local)
            if sent.get(relative) != (stat.st_size, stat.st_mtime_ns):
                _put(source, remote / relative)
                sent[relative] = (stat.st_size, stat.st_mtime_ns)


def _put(source: str, target: epath.Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as f, target.open("wb") as out:  # streamed: a checkpoint shard is gigabytes
        shutil.copyfileobj(f, out, 16 << 20)


@contextlib.contextmanager
def local_copy(path: epath.Path) -> Iterator[str]:
    """A local file holding `path`'s bytes, for libraries that read local files only: `path` itself,
    or a gs:// file streamed into a temporary file, removed on exit."""
    if not is_url(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="idefics_jax-fetch-") as tmp:
        local = os.path.join(tmp, path.name)
        with path.open("rb") as f, open(local, "wb") as out:
            shutil.copyfileobj(f, out, 16 << 20)
        yield local


@contextlib.contextmanager
def local_directory(target: str | os.PathLike, what: str = "Output directory") -> Iterator[str]:
    """A local directory to write `target`'s files into: `target` itself, or for a gs:// URL a
    temporary directory, uploaded to `target` when the writing succeeded (nothing half-written
    lands in the bucket)."""
    if not is_url(target):
        os.makedirs(target, exist_ok=True)
        yield str(target)
        return
    remote = as_path(target, what)  # the bucket is checked before any work
    with tempfile.TemporaryDirectory(prefix="idefics_jax-out-") as local:
        yield local
        upload_tree(local, remote)


class TreeUploader:
    """Mirrors a local directory into a gs:// one from a background thread, so that the training
    loop never waits on the network. `request()` asks for an upload of the files changed since the
    last one (requests made while one runs are served by the next); `close()` waits for the thread
    and uploads what is left. A failed upload is logged and retried at the next request; `close()`
    raises if its own upload fails (the local directory still holds everything)."""

    def __init__(self, local: str | os.PathLike, remote: epath.Path):
        self.local, self.remote = str(local), remote
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when uploaded
        self._wanted, self._closing = threading.Event(), False
        self._thread = threading.Thread(target=self._serve, name=f"upload to {remote}", daemon=True)
        self._thread.start()

    def request(self):
        self._wanted.set()

    def close(self):
        self._closing = True
        self._wanted.set()
        self._thread.join()
        self.upload()

    def upload(self):
        upload_tree(self.local, self.remote, self._sent)

    def _serve(self):
        while True:
            self._wanted.wait()
            if self._closing:
                return
            self._wanted.clear()
            try:
                self.upload()
            except Exception as error:  # noqa: BLE001 - the network, credentials: logged, retried
                log.warning("Uploading %s to %s failed (%s: %s); retrying at the next write", self.local,
                            self.remote, type(error).__name__, error)
