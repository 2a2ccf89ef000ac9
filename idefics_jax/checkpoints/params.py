"""Parameters as a tree checked against the model a config describes, and our own parameter
checkpoints: an orbax tree in `DIR/params` beside `DIR/config.json`.

    save_checkpoint(ckpt_dir, config, params)
    config, params = load_checkpoint(ckpt_dir, shardings=...)   # each array read into its shards
    reader = ParamsReader(ckpt_dir)                             # or a group of arrays at a time
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from typing import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from idefics_jax.config import Idefics2Config
from idefics_jax.models.idefics2 import Idefics2
from idefics_jax.models.quantize import SCALE, has_scales, quantized_layout, quantized_shardings
from idefics_jax.paths import as_path

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SAVE_WINDOW = 10**9  # `save_checkpoint`: bytes copied from devices to the host at once (at most)
READ_GROUP = 5 * 10**8  # `ParamsReader`: bytes read at once (a larger array is read alone)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


def np_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"Unsupported dtype '{dtype}'; choose one of {sorted(_DTYPES)}")
        return np.dtype(_DTYPES[dtype])
    return np.dtype(dtype)


def dtype_name(dtype: np.dtype) -> str:
    for name, value in _DTYPES.items():
        if np.dtype(value) == dtype:
            return name
    return str(dtype)


@functools.lru_cache(maxsize=16)  # every conversion asks, and tracing the model takes seconds
def abstract_params(config: Idefics2Config, dtype=jnp.float32) -> dict:
    """The parameter tree of `Idefics2(config)` as `ShapeDtypeStruct`s (nothing allocated; the
    same tree for the same arguments: do not change it)."""
    model = Idefics2(config, param_dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return nn.meta.unbox(variables["params"])


class _WithoutNotice(logging.Filter):
    """Drops log records that contain `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def save_checkpoint(ckpt_dir: str | os.PathLike, config: Idefics2Config, params):
    """Writes `ckpt_dir/config.json` and the orbax checkpoint `ckpt_dir/params`.

    Arrays on a device are copied to the host a bounded amount at a time (`SAVE_WINDOW` bytes, or an
    eighth of the parameters when less, but always room for the largest array), each written to its
    own files as soon as it is copied (no OCDBT, whose writes wait in memory for the end): saving
    holds little beyond `params` itself."""
    ckpt_dir = as_path(ckpt_dir, "Checkpoint directory")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if (ckpt_dir / "params").exists():
        raise FileExistsError(f"{ckpt_dir / 'params'} exists already; choose an empty directory")
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    dtypes = {np.dtype(x.dtype) for x in leaves}
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves]
    window = max(max(sizes) + 1, min(SAVE_WINDOW, sum(sizes) // 8))  # orbax refuses an array as large as it
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=window / 1e9, use_ocdbt=False,
                                          use_compression=False)  # weights hardly compress; zstd costs time
    quiet = _WithoutNotice("Skipping merge of OCDBT checkpoints")  # orbax's, for every checkpoint without OCDBT
    logging.getLogger("absl").addFilter(quiet)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(ckpt_dir / "params", args=ocp.args.PyTreeSave(nn.meta.unbox(params)))
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    config.to_json_file(ckpt_dir / "config.json", dtype=dtype_name(dtypes.pop()) if len(dtypes) == 1 else "float32")
    return ckpt_dir


def load_checkpoint(ckpt_dir: str | os.PathLike, *, on_device: bool = True, shardings: Mapping | None = None,
                    dtype=None):
    """Reads a checkpoint written by `save_checkpoint`; returns `(config, params)`.

    shardings: optional tree of `jax.sharding.Sharding` (the params' structure, the float model's
    for a quantised checkpoint too: its scales are then split as their kernels): each array is read
    straight into its shards (on several hosts, each reads its own). dtype: cast as read (None: as stored)."""
    ckpt_dir = as_path(ckpt_dir, "Checkpoint directory")
    config, checkpointer, tree = _open(ckpt_dir)
    target_dtype = np_dtype(dtype)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    if flat_shardings and has_scales(traverse_util.flatten_dict(tree)) and not has_scales(flat_shardings):
        flat_shardings = traverse_util.flatten_dict(
            quantized_shardings(shardings, quantized_layout(abstract_params(config))))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def restore_arg(path, stored):
        names = tuple(getattr(key, "key", key) for key in path)
        # int8 weights and their scales stay as quantised (`models/quantize.py`)
        cast = None if names[-1] == SCALE or np.dtype(stored.dtype) == np.int8 else target_dtype
        if not on_device and shardings is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=cast)
        return ocp.ArrayRestoreArgs(sharding=flat_shardings.get(names, one_device), dtype=cast)

    restore_args = jax.tree_util.tree_map_with_path(restore_arg, tree, is_leaf=_is_array)
    params = checkpointer.restore(ckpt_dir / "params", restore_args=restore_args)
    _check(ckpt_dir, config, traverse_util.flatten_dict(params))
    return config, params


class ParamsReader:
    """A checkpoint written by `save_checkpoint`, read a group of arrays at a time into host arrays,
    for work that streams (`save_hf_checkpoint`): `config`; `shapes`, the flat tree (path ->
    `ShapeDtypeStruct`, checked against the model the config describes), known without reading any
    array; `arrays(order)` yields `(path, array)` in `order`, reading about `READ_GROUP` bytes at once
    (orbax partial restores) and the next group in a background thread while the caller works on
    this one: at most two groups are held."""

    def __init__(self, ckpt_dir: str | os.PathLike, group_bytes: int | None = None):
        self.ckpt_dir = as_path(ckpt_dir, "Checkpoint directory")
        self.config, self._checkpointer, tree = _open(self.ckpt_dir)
        self.shapes = {path: jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))
                       for path, x in traverse_util.flatten_dict(tree).items()}
        _check(self.ckpt_dir, self.config, self.shapes)
        self.quantized = has_scales(self.shapes)  # int8 weights (models/quantize.py)
        self.group_bytes = group_bytes or READ_GROUP

    def arrays(self, order: Sequence[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        groups, size = [[]], 0
        for path in order:
            nbytes = int(np.prod(self.shapes[path].shape)) * self.shapes[path].dtype.itemsize
            if groups[-1] and size + nbytes > self.group_bytes:
                groups.append([])
                size = 0
            groups[-1].append(path)
            size += nbytes
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-params") as pool:
            coming = pool.submit(self._read, groups[0])
            for following in [*groups[1:], None]:
                group = coming.result()
                if following is not None:
                    coming = pool.submit(self._read, following)
                yield from group.items()
                del group  # dropped before the next group is waited for

    def _read(self, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
        item = traverse_util.unflatten_dict({path: self.shapes[path] for path in paths})
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._checkpointer.restore(self.ckpt_dir / "params", args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        return traverse_util.flatten_dict(restored)


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _open(ckpt_dir: epath.Path):
    """(config, checkpointer, the params' metadata tree) of a `save_checkpoint` directory."""
    for needed in ("config.json", "params"):
        if not (ckpt_dir / needed).exists():
            raise FileNotFoundError(f"{ckpt_dir} is not an idefics_jax checkpoint: {needed} is missing")
    config = Idefics2Config.from_json_file(ckpt_dir / "config.json")
    checkpointer = ocp.PyTreeCheckpointer()
    return config, checkpointer, checkpointer.metadata(ckpt_dir / "params").item_metadata.tree


def _check(ckpt_dir, config: Idefics2Config, got: Mapping[tuple[str, ...], object]):
    """Every parameter of the model `config` describes is in `got` (flat), of its shape, and no other
    (with int8 weights: each projection's scale too)."""
    abstract = abstract_params(config)
    expected = traverse_util.flatten_dict(quantized_layout(abstract) if has_scales(got) else abstract)
    for path, leaf in expected.items():
        if path not in got:
            raise CheckpointError(f"{ckpt_dir}: parameter '{'/'.join(path)}' is missing (shape {leaf.shape})")
        if tuple(got[path].shape) != tuple(leaf.shape):
            raise CheckpointError(f"{ckpt_dir}: parameter '{'/'.join(path)}' has shape {tuple(got[path].shape)}; "
                                  f"config.json describes {tuple(leaf.shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{ckpt_dir}: unexpected parameter '{'/'.join(extra[0])}'")
