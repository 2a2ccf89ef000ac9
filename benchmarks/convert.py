"""Checkpoint conversion at real width: time and peak resident memory, ours against transformers.

    python benchmarks/convert.py [--dir /tmp/idefics_jax_convert] [--layers 8]

The checkpoint is an Idefics2 of the real widths (the whole SigLIP-SO400M tower at 980 px, the
Perceiver, `--layers` of Mistral-7B's 32 decoder layers, vocabulary 32,003) with random bfloat16
weights, saved once by transformers in 1 GB safetensors shards under `DIR/hf` and reused. Each
conversion runs in a child process of its own, after a `sync` (no run pays for the writes of the
one before), and reports its wall time and peak resident memory (`VmHWM`): the floor (the files
copied once: what any conversion must at least read and write), transformers' `from_pretrained` +
`save_pretrained` of those files, our `convert from-hf` (to an orbax checkpoint) and `convert to-hf`
(back to safetensors), both `--dtype bfloat16`, and reading the Hugging Face files onto the device
or into host arrays (what `load` and `init_from` do). The round trip is checked tensor by tensor
against the original files. Appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# the child's side: run one conversion, then report its time and the process's peak resident memory
CHILD = r"""
import json, runpy, sys, time
argv, started = sys.argv[1:], time.perf_counter()
if argv[0] == "transformers":
    import torch
    from transformers import Idefics2ForConditionalGeneration
    model = Idefics2ForConditionalGeneration.from_pretrained(argv[1], torch_dtype=torch.bfloat16)
    model.save_pretrained(argv[2], max_shard_size="1GB")
elif argv[0] == "copy":  # the floor: the files' bytes read and written once, through one reused buffer
    import glob, os
    os.makedirs(argv[2])
    buffer = memoryview(bytearray(64 << 20))
    for path in glob.glob(os.path.join(argv[1], "*.safetensors")):
        with open(path, "rb") as source, open(os.path.join(argv[2], os.path.basename(path)), "wb") as target:
            while count := source.readinto(buffer):
                target.write(buffer[:count])
elif argv[0] in ("load-device", "load-host"):  # what `load` (one device) and `init_from` (the host) read
    from idefics_jax.checkpoints import load_hf_checkpoint
    config, params = load_hf_checkpoint(argv[1], on_device=argv[0] == "load-device")
else:
    sys.argv = ["idefics_jax.convert", *argv]
    try:
        runpy.run_module("idefics_jax.convert", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT " + json.dumps({"seconds": seconds, "peak_bytes": peak}))
"""


def real_width_config(layers: int):
    """transformers' Idefics2Config at idefics2-8b's widths, with `layers` decoder layers."""
    from transformers import Idefics2Config

    return Idefics2Config(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           patch_size=14, image_size=980),
        perceiver_config=dict(hidden_act="silu", resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                              resampler_head_dim=96, num_key_value_heads=4),
        text_config=dict(vocab_size=32003, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=4096, rms_norm_eps=1e-5, pad_token_id=0),
        image_token_id=32001, tie_word_embeddings=False)


def make_checkpoint(path: Path, layers: int) -> int:
    """Random bfloat16 weights of `real_width_config(layers)` in 1 GB shards (once); its bytes."""
    import torch
    from transformers import Idefics2ForConditionalGeneration

    if not (path / "model.safetensors.index.json").exists():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Idefics2ForConditionalGeneration(real_width_config(layers)).to(torch.bfloat16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(path, max_shard_size="1GB")
    return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def run_child(*argv) -> dict:
    os.sync()  # each run starts with no other run's writes still waiting in the page cache
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"{argv[0]}: {result['seconds']:.1f} s, peak {result['peak_bytes'] / 1e9:.2f} GB", flush=True)
    return result


def same_tensors(a: Path, b: Path) -> int:
    """The number of tensors, after checking that every one in `a` is in `b`, bit for bit."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
    from safetensors import safe_open

    def files(d):
        return {name: d / f for name, f in json.loads((d / "model.safetensors.index.json").read_text())
                ["weight_map"].items()}

    left, right = files(a), files(b)
    if set(left) != set(right):
        raise AssertionError(f"tensor names differ: {sorted(set(left) ^ set(right))[:5]}")
    for name in left:
        with safe_open(left[name], "numpy") as x, safe_open(right[name], "numpy") as y:
            ours, theirs = x.get_tensor(name), y.get_tensor(name)
            if ours.dtype != theirs.dtype or ours.shape != theirs.shape or ours.tobytes() != theirs.tobytes():
                raise AssertionError(f"{name} differs after the round trip")
    return len(left)


def main():
    from preprocess import append_results, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/idefics_jax_convert", help="where the checkpoints go (kept)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Mistral-7B's 32")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    root = Path(args.dir)
    started = time.perf_counter()
    size = make_checkpoint(root / "hf", args.layers)
    print(f"checkpoint: {size / 1e9:.2f} GB of bfloat16 ({time.perf_counter() - started:.0f} s)", flush=True)
    for name in ("copy", "transformers_out", "ours", "back"):
        subprocess.run(["rm", "-rf", str(root / name)], check=True)
    floor = run_child("copy", root / "hf", root / "copy")
    runs = {"the floor: the files copied once (read + write through one buffer)": floor}
    runs["transformers `from_pretrained` + `save_pretrained`"] = run_child("transformers", root / "hf",
                                                                           root / "transformers_out")
    runs["`convert from-hf` (safetensors -> orbax)"] = run_child("from-hf", root / "hf", root / "ours",
                                                                  "--dtype", "bfloat16")
    runs["`convert to-hf` (orbax -> safetensors)"] = run_child("to-hf", root / "ours", root / "back",
                                                                "--dtype", "bfloat16", "--max-shard-size", "1GB")
    runs["`load_hf_checkpoint` onto the device (`load`, `generate`, `serve`)"] = run_child("load-device", root / "hf")
    runs["`load_hf_checkpoint` to host arrays (`--config.model.init_from`)"] = run_child("load-host", root / "hf")
    tensors = same_tensors(root / "hf", root / "back")
    reference = runs["transformers `from_pretrained` + `save_pretrained`"]
    ours = [r for name, r in runs.items() if name.startswith("`convert")]
    lines = [f"\n## Checkpoint conversion at real width ({date.today()}, {machine()})\n",
             f"`benchmarks/convert.py --layers {args.layers}`: Idefics2 at idefics2-8b's widths with {args.layers} of "
             f"the 32 decoder layers, {size / 1e9:.2f} GB of bfloat16 in 1 GB safetensors shards; each conversion "
             f"in a process of its own; peak resident memory (VmHWM) over the model's bytes. The round trip gives "
             f"back all {tensors} tensors bit for bit.\n",
             "| conversion | peak resident memory | x the model | wall time |", "|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['peak_bytes'] / 1e9:.1f} GB | {r['peak_bytes'] / size:.2f} | "
                     f"{r['seconds']:.0f} s |")
    lines.append(f"\nConversion both ways: {sum(r['seconds'] for r in ours):.0f} s against transformers' "
                 f"{reference['seconds']:.0f} s for its load + save; peak {max(r['peak_bytes'] for r in ours) / 1e9:.1f} "
                 f"GB against {reference['peak_bytes'] / 1e9:.1f} GB. Each direction reads and writes the "
                 f"model once, as transformers' load + save does: the floor of both directions is two copies, "
                 f"{2 * floor['seconds']:.0f} s.")
    print("\n".join(lines))
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
