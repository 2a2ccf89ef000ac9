"""Host memory on CPU runs: with `reuse_freed_memory`, repeated XLA:CPU steps stop faulting their
buffers in afresh; accelerator hosts are left alone."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from idefics_jax.host_memory import ENVIRONMENT, accelerator_runtime_installed

# A jitted step whose temporaries and output (~40 MB each) are freed and allocated again each call,
# run in a fresh process (the allocator must be set before XLA starts its threads); prints the
# minor page faults of each of the last 10 calls.
STEPS = textwrap.dedent("""
    import json, resource, sys
    if sys.argv[1] == "reuse":
        from idefics_jax.host_memory import reuse_freed_memory
        assert reuse_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((2560, 4096), jnp.float32)
    step = jax.jit(lambda x: jnp.tanh(x @ jnp.eye(4096, dtype=x.dtype)[:, :2048]).sum(0) + jnp.exp(x).sum(1)[:2048])
    for _ in range(10):  # the heap grows to its size
        step(x).block_until_ready()
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
""")


def faults(mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}  # conftest sets them for the suite
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reused_memory_stops_page_faults_of_repeated_steps():
    default, reused = faults("default"), faults("reuse")
    # by default each call maps its ~40 MB of buffers again (~16,000 pages of 4 KB); reused, they stay
    # mapped. The median call is compared: the reused heap still grows now and then (a call that
    # finds no free chunk of the right size, more often when other processes load the machine).
    assert statistics.median(default) > 8_000, default
    assert statistics.median(reused) < statistics.median(default) / 5, (reused, default)


def test_accelerator_hosts_are_left_alone(monkeypatch):
    for platforms, accelerator in [("cpu", False), ("cuda", True), ("cpu,tpu", True), ("tpu", True)]:
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert accelerator_runtime_installed() is accelerator, platforms
