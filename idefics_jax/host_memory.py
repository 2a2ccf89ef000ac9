"""Host memory on CPU-only runs: a step's freed buffers stay mapped for the next step.

XLA:CPU takes each step's buffers from malloc. glibc gives its worker threads arenas of their
own, serves large chunks with mmap and hands freed memory back to the kernel, so every step
maps its temporaries again and faults them in page by page. `reuse_freed_memory()` sets glibc to
one arena, no mmap'd chunks and no trimming below 2 GB: the process keeps what it has freed and the
next step's buffers come back already mapped (what that saves: docs/training.md).

It must run before XLA starts its threads (before the first computation or `jax.devices()`): a
thread that already has an arena keeps it. The training command line calls
`reuse_freed_memory_on_cpu()` first thing; it leaves hosts with a GPU or TPU runtime alone, whose
many input-pipeline threads want their own arenas and whose large host buffers (checkpoint
restores) should go back to the kernel. Elsewhere than glibc it does nothing. Generation does not
set it: its buffers are small, and its decode steps ran slower with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil

import jax

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_BELOW = 2**31 - 1  # bytes of free memory at the heap's top that are not given back (mallopt takes an int)
# the same settings as glibc's environment variables, for processes started from this one
ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(KEEP_BELOW)}


def accelerator_runtime_installed() -> bool:
    """Whether jax may pick a GPU or TPU on this host: `JAX_PLATFORMS` names one, or a PJRT plugin
    (the `jax_plugins` namespace or entry points, as jax discovers them) or libtpu is installed."""
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    if importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH"):
        return True
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or importlib.metadata.entry_points(group="jax_plugins"):
        return True
    plugins = importlib.util.find_spec("jax_plugins")
    return bool(plugins and any(pkgutil.iter_modules(plugins.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (whose mallopt parameters and malloc_trim this module uses), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def reuse_freed_memory() -> bool:
    """Sets glibc's allocator to keep freed memory (see the module's doc); False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return all([libc.mallopt(M_ARENA_MAX, 1), libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW)])


def release_freed_memory() -> bool:
    """Hands the memory freed so far back to the kernel (glibc's `malloc_trim`, every arena): after a
    burst of large, short-lived buffers (a server's decoded images) the process does not keep its
    peak. False where there is no glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def reuse_freed_memory_on_cpu() -> bool:
    """`reuse_freed_memory()` unless a GPU or TPU runtime is installed; whether it was set."""
    if accelerator_runtime_installed():
        return False
    done = reuse_freed_memory()
    if done:
        log.debug("glibc malloc: one arena, no mmap'd chunks, freed memory kept (CPU run)")
    return done
