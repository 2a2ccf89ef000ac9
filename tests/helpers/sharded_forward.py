"""Run by test_sharding.py in a fresh process with 8 simulated CPU devices.

Loads a converted checkpoint, runs the forward pass unsharded and sharded on several
(data, fsdp, tensor) meshes, and exits non-zero if the logits differ.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from idefics_jax import Idefics2, load_hf_checkpoint  # noqa: E402
from idefics_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, make_mesh, param_shardings  # noqa: E402


def main(hf_dir, seed):
    assert len(jax.devices()) == 8, jax.devices()
    config, params = load_hf_checkpoint(hf_dir)
    model = Idefics2(config)
    rng = np.random.default_rng(seed)
    n = config.image_seq_len
    rows = [np.concatenate([rng.integers(3, 99, 5), [config.image_token_id] * n, rng.integers(3, 99, 7)])
            for _ in range(8)]
    input_ids = np.stack(rows).astype(np.int32)
    pixel_values = rng.uniform(-1, 1, size=(8, 1, 24, 36, 3)).astype(np.float32)
    pixel_mask = np.ones((8, 1, 24, 36), bool)
    args = (input_ids, pixel_values, pixel_mask)
    forward = lambda p, ids, pv, pm: model.apply({"params": p}, ids, pixel_values=pv, pixel_attention_mask=pm)
    expected = np.asarray(jax.jit(forward)(params, *args))
    # two simulated slices of 4 devices (granule: device id // 4), data parallel across them
    two_slices = make_mesh(1, 2, 2, dcn=(2, 1, 1), granule=lambda d: d.id // 4)
    assert dict(two_slices.shape) == {"data": 2, "fsdp": 2, "tensor": 2}, two_slices.shape
    assert {d.id // 4 for d in two_slices.devices[0].flat} == {0}, "a slice must stay within one data index"
    assert {d.id // 4 for d in two_slices.devices[1].flat} == {1}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), "two slices"]:
        mesh = two_slices if shape == "two slices" else make_mesh(*shape)
        shape = tuple(mesh.shape.values())
        shardings = param_shardings(model, mesh)
        sharded = jax.device_put(params, shardings)
        q = sharded["model"]["text_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert len(q.addressable_shards) == 8
        if shape[1] * shape[2] > 1:
            assert q.addressable_shards[0].data.size < q.size, "parameters were not sharded"
        batch = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in args]
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            got = np.asarray(jax.jit(forward)(sharded, *batch))
            if shape == (2, 2, 2):  # the decoder's activation layout is in the program
                assert '{"data", "fsdp"}' in jax.jit(forward).lower(sharded, *batch).as_text()
        err = np.abs(got - expected).max() / np.abs(expected).max()
        print(f"mesh {shape}: relative error {err:.2e}")
        if not err < 1e-5:
            sys.exit(f"mesh {shape}: sharded logits differ (relative error {err:.2e})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
