"""Run by test_generate.py in a fresh process with 8 simulated CPU devices.

Generates with a converted checkpoint unsharded and on several (data, fsdp, tensor) meshes, and
exits non-zero unless the tokens are identical and the parameters and the KV cache are sharded.
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idefics_jax import Idefics2, load_hf_checkpoint  # noqa: E402
from idefics_jax.inference.conversation import Conversation  # noqa: E402
from idefics_jax.inference.generate import Generator  # noqa: E402
from idefics_jax.inference.sampling import GREEDY, Sampling, row_keys  # noqa: E402
from idefics_jax.sharding import make_mesh, param_shardings  # noqa: E402
from helpers.inputs import make_batch  # noqa: E402

NEW = 12


def mesh(*shape):
    return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])


def main(hf_dir, seed):
    assert len(jax.devices()) == 8, jax.devices()
    config, params = load_hf_checkpoint(hf_dir)
    model = Idefics2(config)
    rng = np.random.default_rng([seed, 500])
    rows = [([4, 3], [(40, 36)]), ([9, 15], [(28, 52)]), ([2], []), ([5, 6], [(20, 44)])]
    ids, mask, pixels, pixel_mask = make_batch(rng, rows, config.image_seq_len)
    pixels[2], pixel_mask[2] = 0, False  # the third row has no image
    inputs = (ids, mask, pixels, pixel_mask)
    sampled = Sampling(temperature=0.8, top_k=20, repetition_penalty=1.2)
    one_device = Generator(model, params)
    expected = one_device.generate(*inputs, max_new_tokens=NEW)
    expected_sampled = one_device.generate(*inputs, max_new_tokens=NEW, sampling=sampled, seed=3)
    for shape in [(2, 1, 2), (1, 2, 4), (4, 2, 1)]:  # tensor with data, with fsdp; fsdp with data
        generator = Generator(model, params, mesh=mesh(*shape))
        k_proj = generator.params["model"]["text_model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
        if k_proj.addressable_shards[0].data.size == k_proj.size and shape[1] * shape[2] > 1:
            sys.exit(f"mesh {shape}: the parameters were not sharded")
        got = generator.generate(*inputs, max_new_tokens=NEW)
        print(f"mesh {shape}: greedy tokens equal: {np.array_equal(got, expected)}")
        if not np.array_equal(got, expected):
            sys.exit(f"mesh {shape}: greedy tokens differ\n{got}\n{expected}")
    generator = Generator(model, params, mesh=mesh(2, 1, 2))
    got = generator.generate(*inputs, max_new_tokens=NEW, sampling=sampled, seed=3)
    streamed = np.stack(list(generator.stream(*inputs, max_new_tokens=NEW)), axis=1)
    odd = one_device.generate(*(x[:3] for x in inputs), max_new_tokens=NEW)
    got_odd = generator.generate(*(x[:3] for x in inputs), max_new_tokens=NEW)  # 3 rows: data=2 cannot split them
    for name, a, b in [("sampled", got, expected_sampled), ("streamed", streamed, expected), ("3 rows", got_odd, odd)]:
        print(f"mesh (2, 1, 2), {name}: equal: {np.array_equal(a, b)}")
        if not np.array_equal(a, b):
            sys.exit(f"mesh (2, 1, 2), {name}: tokens differ\n{a}\n{b}")
    state, token, _ = generator.first(generator.place(inputs), row_keys(0, len(ids)), max_columns=ids.shape[1] + NEW,
                                      sampling=GREEDY)
    specs = (tuple(state.cache.keys[0].sharding.spec), tuple(token.sharding.spec))
    print(f"cache keys {state.cache.keys[0].shape} laid out {specs[0]}, tokens {specs[1]}")
    if specs[0][:2] != ("data", "tensor") or any(specs[1]):
        sys.exit(f"the KV cache should be split over (data, tensor) and tokens replicated, got {specs}")
    check_conversation(model, params, config, rng, one_device)
    check_batcher(model, params, inputs, one_device, expected, sampled)
    check_sharded_loading(hf_dir, model, params, inputs, expected)
    check_int8(model, params, inputs)


def check_int8(model, params, inputs):
    """int8 weights on a (1, 2, 4) mesh: kernels and their scales split as the rules split the float
    kernels, the same tokens as one device with the same int8 weights."""
    from idefics_jax.models.quantize import quantize_params

    quantized = quantize_params(jax.tree.map(np.asarray, params))
    expected = Generator(model, quantized).generate(*inputs, max_new_tokens=NEW)
    generator = Generator(model, quantized, mesh=mesh(1, 2, 4))
    q_proj = generator.params["model"]["text_model"]["layers_0"]["self_attn"]["q_proj"]
    specs = (tuple(q_proj["kernel"].sharding.spec), tuple(q_proj["kernel_scale"].sharding.spec))
    got = generator.generate(*inputs, max_new_tokens=NEW)
    print(f"mesh (1, 2, 4), int8 weights laid out {specs}: equal: {np.array_equal(got, expected)}")
    if q_proj["kernel"].dtype != np.int8 or specs[1] != specs[0][1:] or not np.array_equal(got, expected):
        sys.exit(f"int8 on mesh (1, 2, 4): {q_proj['kernel'].dtype} laid out {specs}\n{got}\n{expected}")
    # saved, then read straight into the mesh's shards with the float model's shardings
    import tempfile

    from idefics_jax.checkpoints import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as ours:
        save_checkpoint(Path(ours) / "q", model.config, quantized)
        _, read = load_checkpoint(Path(ours) / "q", shardings=param_shardings(model, mesh(1, 2, 4)))
    placed = read["model"]["text_model"]["layers_0"]["self_attn"]["q_proj"]
    read_specs = (tuple(placed["kernel"].sharding.spec), tuple(placed["kernel_scale"].sharding.spec))
    print(f"int8 checkpoint read into mesh (1, 2, 4) shards as {read_specs}")
    if read_specs != specs:
        sys.exit(f"int8 checkpoint read into {read_specs}, Generator lays it out as {specs}")


def check_sharded_loading(hf_dir, model, params, inputs, expected):
    """Checkpoints read straight into a (1, 2, 4) mesh's shards (safetensors and orbax) hold the
    parameters in the layout Generator uses, and generate the same tokens."""
    import tempfile

    from idefics_jax.checkpoints import load_checkpoint, save_checkpoint

    on = mesh(1, 2, 4)
    shardings = param_shardings(model, on)
    with tempfile.TemporaryDirectory() as ours:
        save_checkpoint(Path(ours) / "ckpt", model.config, params)
        for name, (_, loaded) in [("safetensors", load_hf_checkpoint(hf_dir, shardings=shardings)),
                                  ("orbax", load_checkpoint(Path(ours) / "ckpt", shardings=shardings))]:
            placed = jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                                  loaded, shardings))
            generator = Generator(model, loaded, mesh=on)
            got = generator.generate(*inputs, max_new_tokens=NEW)
            equal = np.array_equal(got, expected)
            # already on the mesh: the generator keeps the arrays it was given (no second placement)
            kept = all(a is b for a, b in zip(jax.tree.leaves(generator.params), jax.tree.leaves(loaded)))
            print(f"mesh (1, 2, 4), read sharded from {name}: placed {all(placed)}, kept {kept}, equal: {equal}")
            if not all(placed) or not equal or not kept:
                sys.exit(f"{name}: {sum(placed)} of {len(placed)} parameters placed as the rules say, kept: {kept}"
                         f"\n{got}\n{expected}")


def check_batcher(model, params, inputs, one_device, expected, sampled):
    """Continuous batching on a (2, 1, 2) mesh, three tokens per device call: a greedy request, then a
    sampled one joining it 3 steps later, each answered as on one device (the cache split over rows
    and key/value heads)."""
    from idefics_jax.inference.batcher import Batcher

    one = lambda i: tuple(x[i:i + 1] for x in inputs)
    batcher = Batcher(Generator(model, params, mesh=mesh(2, 1, 2)), rows=2)
    rows, got = {batcher.admit(*one(0), max_new_tokens=NEW): 0}, {0: [], 3: []}
    while len(got[3]) < NEW:
        if batcher.steps == 3:
            rows[batcher.admit(*one(3), max_new_tokens=NEW, sampling=sampled, seed=3)] = 3
        tokens = batcher.advance(3)
        for row, i in rows.items():
            got[i] = (got[i] + [int(t) for t in tokens[row]])[:NEW]
    alone = [expected[0].tolist(), one_device.generate(*one(3), max_new_tokens=NEW, sampling=sampled, seed=3)[0].tolist()]
    layout = tuple(batcher.state.state.cache.keys[0].sharding.spec)[:2]
    equal = [got[0], got[3]] == alone
    print(f"mesh (2, 1, 2), continuous batching: equal: {equal}, cache laid out {layout}")
    if not equal or layout != ("data", "tensor"):
        sys.exit(f"mesh (2, 1, 2): the batcher's answers {got} differ from one device's {alone}, or its cache is "
                 f"laid out {layout}")


def check_conversation(model, params, config, rng, one_device):
    """Two chat turns on a (1, 1, 2) mesh, the second reusing the cache, equal those on one device."""
    image = rng.uniform(-1, 1, size=(24, 36, 3)).astype(np.float32)
    first = rng.integers(3, 90, size=5).tolist() + [config.image_token_id] * config.image_seq_len + [7, 8]
    answers = []
    for generator in (one_device, Generator(model, params, mesh=mesh(1, 1, 2))):
        conversation = Conversation(generator, image_token_id=config.image_token_id, image_seq_len=config.image_seq_len)
        answer = list(conversation.stream(first, [image], max_new_tokens=NEW))
        second = first + [5 if t == config.image_token_id else t for t in answer] + [9, 10, 11]
        answers.append((answer, list(conversation.stream(second, [image], max_new_tokens=NEW)), conversation.reused))
    print(f"mesh (1, 1, 2), conversation: equal: {answers[0] == answers[1]}, reused {answers[1][2]} tokens")
    if answers[0] != answers[1] or answers[1][2] < len(first):
        sys.exit(f"mesh (1, 1, 2): the conversation differs from one device's\n{answers[1]}\n{answers[0]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
