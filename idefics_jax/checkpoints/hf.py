"""Hugging Face Idefics2 checkpoints <-> our parameters, tensor by tensor.

    config, params = load_hf_checkpoint(hf_dir)        # config.json + (sharded) safetensors
    save_hf_checkpoint(out_dir, config, params)         # transformers' from_pretrained loads it
    save_hf_checkpoint(out_dir, reader.config, reader)  # from a ParamsReader: a group at a time

Both stream: one tensor is read, transformed and placed at a time, so peak host memory is about
one copy of the model. Every name, shape and dtype is checked against the model the config
describes; a missing, unexpected or mis-shaped tensor is an error naming the key and both shapes.
Every directory may be a local path or a gs:// URL (see `idefics_jax.paths`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from idefics_jax.config import Idefics2Config
from idefics_jax.checkpoints.names import hf_name, hf_shape, leaf_rule
from idefics_jax.checkpoints.params import CheckpointError, ParamsReader, abstract_params, dtype_name, np_dtype
from idefics_jax.models.quantize import has_scales
from idefics_jax.paths import as_path, local_copy, local_directory
from idefics_jax.sharding import put_everywhere

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def _name_map(config: Idefics2Config) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Hugging Face name -> (our path, leaf rule), with the expected Flax shape."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params(config)).items():
        rule = leaf_rule(path[-1], len(leaf.shape))
        out[hf_name(path, len(leaf.shape))] = (path, rule, tuple(leaf.shape))
    return out


def _safetensors_files(hf_dir: epath.Path) -> list[epath.Path]:
    if (hf_dir / SAFE_INDEX).exists():
        weight_map = json.loads((hf_dir / SAFE_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (hf_dir / name).exists()]
        if missing:
            raise FileNotFoundError(f"{hf_dir / SAFE_INDEX} names shard(s) that do not exist: {missing}")
        return [hf_dir / name for name in files]
    if (hf_dir / SAFE_SINGLE).exists():
        return [hf_dir / SAFE_SINGLE]
    raise FileNotFoundError(
        f"No {SAFE_SINGLE} or {SAFE_INDEX} in {hf_dir}: expected a Hugging Face checkpoint saved with "
        "safetensors (save_pretrained(..., safe_serialization=True))"
    )


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_NUMPY_DTYPES = {code: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
                 for name, code in _SAFETENSORS_DTYPES.items()}


class SafetensorsReader:
    """A safetensors file read tensor by tensor with plain reads into fresh arrays, not memory-mapped
    (mapped pages read once would stay resident for as long as the file is open); every entry of
    the header is checked against the file's size. A truncated or corrupt file is a CheckpointError
    naming `shown` (the file as the user named it)."""

    def __init__(self, path: str, shown):
        self.file, self.shown = open(path, "rb"), shown
        try:
            size = os.fstat(self.file.fileno()).st_size
            length = int.from_bytes(self.file.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(self.file.read(length))
            header.pop("__metadata__", None)
            self.start, self.entries = 8 + length, {}
            for name, entry in header.items():
                dtype, shape = _NUMPY_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
                if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or self.start + end > size:
                    raise ValueError(f"tensor '{name}' does not fit the file")
                self.entries[name] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            self.file.close()
            raise CheckpointError(f"{shown} is not a readable safetensors file ({error})") from error

    def keys(self) -> list[str]:
        """The tensors' names in the order they are stored (reading them so is sequential)."""
        return sorted(self.entries, key=lambda name: self.entries[name][2])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        array = np.empty(shape, dtype)
        self.file.seek(self.start + begin)
        if self.file.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
            raise CheckpointError(f"{self.shown}: tensor '{name}' is cut short")
        return array

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def load_hf_checkpoint(hf_dir: str | os.PathLike, *, dtype=None, on_device: bool = True, device=None,
                       shardings: Mapping | None = None, progress: bool = False):
    """Reads a Hugging Face Idefics2 checkpoint directory; returns `(config, params)`.

    dtype: the parameters' dtype (`"float32"`, `"bfloat16"`, a numpy dtype); None keeps each
    tensor's stored dtype. on_device: place each tensor on `device` (default: the default device)
    as it is read (False keeps numpy arrays on the host). shardings: optional tree of `jax.sharding.Sharding`
    (same structure as the params) to place each tensor sharded as it is read. From a gs:// URL
    each shard is fetched to a temporary file while it is read.
    """
    hf_dir = as_path(hf_dir, "Hugging Face directory")
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"No config.json in {hf_dir}")
    config = Idefics2Config.from_json_file(hf_dir / "config.json")
    expected = _name_map(config)
    target_dtype = np_dtype(dtype)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else None

    files = _safetensors_files(hf_dir)
    flat: dict[tuple[str, ...], Any] = {}
    seen: dict[str, epath.Path] = {}
    with tqdm(desc=f"Reading {hf_dir.name}", unit="tensor", total=len(expected), disable=not progress) as bar:
        for file in files:
            with local_copy(file) as local, SafetensorsReader(local, file) as f:
                for name in f.keys():
                    if name in seen:
                        raise CheckpointError(f"Tensor '{name}' appears in both {seen[name].name} and {file.name}")
                    seen[name] = file
                    if name not in expected:
                        if name == "lm_head.weight" and config.tie_word_embeddings:
                            continue  # tied to embed_tokens; our model has no separate lm_head
                        raise CheckpointError(
                            f"Unexpected tensor '{name}' (shape {f.shape(name)}) in "
                            f"{file.name}: the model described by config.json has no such parameter"
                        )
                    path, rule, flax_shape = expected[name]
                    stored_shape = f.shape(name)
                    want_hf_shape = hf_shape(flax_shape, rule)
                    if stored_shape != want_hf_shape:
                        raise CheckpointError(
                            f"Tensor '{name}' in {file.name} has shape {stored_shape}, but config.json "
                            f"describes shape {want_hf_shape}"
                        )
                    array = np.ascontiguousarray(rule.to_flax(f.read(name)))
                    if target_dtype is not None and array.dtype != target_dtype:
                        array = array.astype(target_dtype)
                    if flat_shardings is not None:
                        array = put_everywhere(array, flat_shardings[path])
                    elif on_device:
                        array = jax.device_put(array, device)
                    flat[path] = array
                    bar.update()
    missing = [name for name in expected if name not in seen]
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {hf_dir}: "
            + ", ".join(f"'{n}' (expected shape {hf_shape(expected[n][2], expected[n][1])})" for n in missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    return config, traverse_util.unflatten_dict(flat)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"Cannot read the size '{size}' (examples: 5GB, 500MB, 1000000)")


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) first,
    from `entries` `[(name, dtype, shape)]`, then each tensor's bytes as `write(name, array)` is called
    in that order, so that only the tensor being written is held. A file left incomplete is removed."""

    def __init__(self, path: str, entries, metadata: Mapping[str, str] | None = None):
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        self.expected = []
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            if dtype.name not in _SAFETENSORS_DTYPES:
                raise ValueError(f"Tensor '{name}': safetensors has no {dtype.name}")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self.written = path, 0
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, array: np.ndarray):
        want = self.expected[self.written]
        got = (name, np.dtype(array.dtype), tuple(array.shape))
        if got != want:
            raise CheckpointError(f"{self.path}: expected tensor {want} next, got {got}")
        self.file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self.written += 1

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.file.close()
        if error is not None or self.written != len(self.expected):
            os.remove(self.path)
            if error is None:
                raise CheckpointError(f"{self.path}: {len(self.expected) - self.written} tensor(s) never written")


def save_hf_checkpoint(out_dir: str | os.PathLike, config: Idefics2Config, params: Any | ParamsReader, *,
                       dtype=None, max_shard_size: int | str = "5GB", progress: bool = False):
    """Writes `config.json`, `model.safetensors.index.json` and `model-0000i-of-0000n.safetensors`.

    params: the tree of arrays, or a `ParamsReader` over a checkpoint on disk (then only two of its
    groups are held, one read while the other is written). dtype: the stored dtype (None keeps each
    parameter's dtype). Tensors are fetched from the devices, transformed and written one at a time
    (`SafetensorsWriter`): beyond `params`, the host holds one tensor. Shards of an earlier
    checkpoint in `out_dir` that the new index does not name are removed. To a gs:// URL each shard
    is written locally, then uploaded. On several processes (hosts) every one calls this: each
    tensor is gathered from the hosts holding its shards, and process 0 converts it and writes the
    files (the others only take part in the gathers).
    """
    if config.hf_architecture_error():
        raise CheckpointError(f"Cannot export to the Hugging Face format: {config.hf_architecture_error()}")
    if has_scales(params.shapes if isinstance(params, ParamsReader) else traverse_util.flatten_dict(params)):
        raise CheckpointError("Cannot export int8 weights to the Hugging Face format: export the float checkpoint "
                              "they were quantised from")
    out_dir = as_path(out_dir, "Output directory")
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    target_dtype = np_dtype(dtype)
    reader = params if isinstance(params, ParamsReader) else None
    flat = reader.shapes if reader is not None else traverse_util.flatten_dict(nn.meta.unbox(params))
    expected = {path: (name, rule, shape) for name, (path, rule, shape) in _name_map(config).items()}
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise CheckpointError(f"Parameter '{'/'.join(unexpected[0])}' is not part of the model config describes")
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise CheckpointError(f"Parameter '{'/'.join(missing[0])}' is missing (expected shape {expected[missing[0]][2]})")
    for path, (name, _, shape) in expected.items():
        if tuple(flat[path].shape) != shape:
            raise CheckpointError(
                f"Parameter '{'/'.join(path)}' ({name}) has shape {tuple(flat[path].shape)}; config describes {shape}")

    # Plan the shards from shapes alone, in Hugging Face name order.
    order = sorted(expected, key=lambda p: expected[p][0])
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, ...]]] = [[]]
    shard_bytes, total = 0, 0
    for path in order:
        leaf = flat[path]
        nbytes = int(np.prod(leaf.shape)) * (target_dtype or np.dtype(leaf.dtype)).itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(path)
        shard_bytes += nbytes
        total += nbytes

    # the writer's arrays, in the order written
    arrays = (array for _, array in reader.arrays(order)) if reader else (_whole(flat[path]) for path in order)
    weight_map = {}
    stored_dtypes = set()
    with tqdm(desc=f"Writing {out_dir.name}", unit="tensor", total=len(order), disable=not (progress and writer)) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if not writer:  # it only takes part in gathering the arrays split over processes
                for path in shard:
                    if _split_over_processes(flat[path]):
                        _whole(flat[path])
                continue
            entries = [(expected[path][0], target_dtype or np.dtype(flat[path].dtype),
                        hf_shape(expected[path][2], expected[path][1])) for path in shard]
            with local_directory(out_dir) as local, SafetensorsWriter(os.path.join(local, file), entries) as out:
                for path in shard:  # one tensor held at a time: fetched, transformed, written, dropped
                    name, rule, _ = expected[path]
                    array = next(arrays)
                    if target_dtype is not None and array.dtype != target_dtype:
                        array = array.astype(target_dtype)
                    out.write(name, rule.to_hf(array))
                    stored_dtypes.add(array.dtype)
                    weight_map[name] = file
                    bar.update()
    if writer:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / SAFE_SINGLE]:  # an earlier checkpoint's
            if stale.name not in weight_map.values() and stale.exists():
                stale.unlink()
        stored = dtype_name(stored_dtypes.pop()) if len(stored_dtypes) == 1 else "float32"
        config.to_json_file(out_dir / "config.json", dtype=stored)
    if jax.process_count() > 1:  # every process returns once the checkpoint is complete
        multihost_utils.sync_global_devices(f"save_hf_checkpoint {out_dir}")
    return out_dir


def _split_over_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _whole(x) -> np.ndarray:
    """`x` whole on this host: an array split over other processes' devices is gathered from them
    (every process must ask for the same arrays in the same order)."""
    if _split_over_processes(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
