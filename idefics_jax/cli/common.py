"""What the inference command lines share: device flags, start-up, opening a model, user errors."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from idefics_jax.checkpoints import CheckpointError, load
from idefics_jax.config import ConfigError
from idefics_jax.data.image_processing import ImageError
from idefics_jax.distributed import DEFAULT_COMPILATION_CACHE, DistributedError, initialize, use_compilation_cache
from idefics_jax.inference.assistant import Assistant
from idefics_jax.sharding import make_mesh, parse_mesh

# errors that a command line reports as `error: ...` (exit status 2): bad input, never a bug
USER_ERRORS = (ValueError, FileNotFoundError, ImageError, CheckpointError, ConfigError, DistributedError)


def add_split_argument(p: argparse.ArgumentParser):
    """--split / --no-split: how many visual tokens an image gets."""
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=None,
                   help="split images: Idefics2's 4 crops + the whole (320 visual tokens, not 64), Idefics3's and "
                        "SmolVLM's grid of tiles + the whole (--no-split: one tile); default: as the checkpoint's "
                        "image settings (preprocessor_config.json's do_image_splitting) say")


def add_device_arguments(p: argparse.ArgumentParser):
    """--dtype, --quantize, --mesh and --compilation_cache."""
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the parameters' and the computation's dtype (bfloat16: half the memory)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8 weights (per output channel) for every projection: about a quarter of float32's "
                        "memory and half of bfloat16's bytes per decode step (the logits' error: docs/inference.md)")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR: generate on a mesh of the visible devices, e.g. 1,1,8 (tensor "
                   "parallel over 8); -1 takes the rest of the devices: --mesh=1,1,-1; default: one device, or with "
                   "several processes PROCESSES,1,-1")
    p.add_argument("--compilation_cache", default=DEFAULT_COMPILATION_CACHE,
                   help="keep compiled programs here, so that the next run starts sooner ('': off; default %(default)s)")


def start(args):
    """`jax.distributed` set up when the launcher asked for it (`idefics_jax.distributed.initialize`),
    the compilation cache, then the mesh to generate on: `--mesh`'s; without one, None (one device)
    in a single process and (processes, 1, devices per process) in several."""
    initialize()
    use_compilation_cache(args.compilation_cache)
    if args.mesh:
        return parse_mesh(args.mesh)
    return make_mesh(jax.process_count(), 1, -1) if jax.process_count() > 1 else None


def open_model(args, mesh):
    """The checkpoint `args.checkpoint` loaded in `args.dtype` (onto `mesh` when there is one)."""
    return load(args.checkpoint, tokenizer=args.tokenizer, mesh=mesh, dtype=jnp.dtype(args.dtype),
                quantize=args.quantize)


def open_assistant(args, mesh) -> Assistant:
    """An `Assistant` over `open_model(args, mesh)`."""
    return Assistant(open_model(args, mesh), dtype=jnp.dtype(args.dtype), mesh=mesh)
