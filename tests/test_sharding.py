"""Logical axis names on every parameter, and the sharded forward pass on a simulated 8-device mesh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest

from conftest import xla_flags
from idefics_jax import Idefics2, Idefics2Config
from idefics_jax.sharding import LOGICAL_AXIS_RULES, constrain, fit_spec, logical_specs, make_mesh


def test_every_parameter_has_logical_axis_names():
    config = Idefics2Config.preset("tiny")
    specs = logical_specs(Idefics2(config))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(Idefics2(config).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 1), int))))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes["params"])
    assert len(flat_specs) == len(flat_shapes)
    for (path, spec), (_, shape) in zip(flat_specs, flat_shapes):
        name = jax.tree_util.keystr(path)
        assert isinstance(spec, jax.sharding.PartitionSpec), name
        assert len(spec) == len(shape.shape), name
        assert any(axis is not None for axis in spec), f"{name} has no named axis"
        assert all(axis is None or axis in known for axis in spec), f"{name}: {spec} not in the rule table"


def test_constrain_is_live_only_under_a_mesh_and_fits_the_shape():
    """Activation layouts take effect under `jax.set_mesh` (the legacy `with mesh:` leaves jax's
    abstract mesh empty, and flax's constraints were silently dropped under it)."""
    f = jax.jit(lambda x: constrain(x * 2, "activation_batch", None))
    x = jax.numpy.ones((4, 3))
    assert "sharding_constraint" not in f.lower(x).as_text()
    with jax.set_mesh(make_mesh(-1, 1, 1)), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        assert "sharding_constraint" in f.lower(x).as_text()
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 4}
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    assert fit_spec((8, 12), spec, mesh_shape) == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    assert fit_spec((3, 12, 5), spec, mesh_shape) == jax.sharding.PartitionSpec(None, "tensor", None)
    assert fit_spec((8, 2), spec, mesh_shape) == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="needs 2 slices, but the devices form 1"):
        make_mesh(1, -1, 1, dcn=(2, 1, 1))


def test_sharded_forward_on_eight_simulated_devices(hf_dir, seed):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR="")  # compiled afresh: the partitioner's warnings below
    script = Path(__file__).parent / "helpers" / "sharded_forward.py"
    result = subprocess.run([sys.executable, str(script), str(hf_dir[0]), str(seed)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("relative error") == 5, result.stdout
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-4000:]  # a replicated op
