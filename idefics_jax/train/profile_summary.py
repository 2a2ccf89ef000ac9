"""A `jax.profiler` trace read per op class: where a step's device time goes.

    python -m idefics_jax.train.profile_summary WORKDIR/profile

Every op the trace times names its HLO instruction (`hlo_op`); the compiled program's text (saved
beside the trace as `step.hlo.txt` by the training loop's profiler) says what that instruction is:
its opcode, its custom-call target and the JAX source path it came from (`op_name`, which carries
the Flax module path and the named scopes `attention` and `optimizer`). Each op is put in one class:

    collectives  all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
    copies       copy, transpose, dynamic-update-slice, and the host offloads' copy-start / done
    optimizer    anything under the train step's `optimizer` scope (AdamW, clipping, the update)
    attention    anything under `ops.attention`'s `attention` scope, and attention kernels' custom calls
    matmuls      dots, convolutions and GEMM custom calls (the weight products)
    norms        anything in a norm module (RMSNorm, LayerNorm)
    other        the rest (embeddings, activations, the loss, RoPE, ...)

and the summary gives each class's device time, share and op count over the traced steps.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

CLASSES = ("matmuls", "attention", "norms", "optimizer", "copies", "collectives", "other")
HLO_FILE = "step.hlo.txt"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COPIES = ("copy", "copy-start", "copy-done", "transpose", "dynamic-update-slice")
_NORM = re.compile(r"(^|/)[\w]*(norm|layernorm|layer_norm)[\w]*(/|$)", re.IGNORECASE)
_ATTENTION_KERNELS = re.compile(r"triton|mosaic|fmha|flash|splash|tpu_custom_call", re.IGNORECASE)
_GEMM = re.compile(r"gemm|cublas|matmul", re.IGNORECASE)


def classify(opcode: str, op_name: str = "", target: str = "") -> str:
    """The class of one HLO instruction (see the module docstring)."""
    base = opcode.removesuffix("-start").removesuffix("-done")
    if base in _COLLECTIVES:
        return "collectives"
    if opcode in _COPIES:
        return "copies"
    if "/optimizer/" in f"/{op_name}/":
        return "optimizer"
    if "/attention/" in f"/{op_name}/" or (opcode == "custom-call" and _ATTENTION_KERNELS.search(target)):
        return "attention"
    if opcode in ("dot", "convolution") or (opcode == "custom-call" and _GEMM.search(target)) or \
            re.search(r"(dot_general|conv_general_dilated)$", op_name):
        return "matmuls"
    if _NORM.search(op_name):
        return "norms"
    return "other"


def op_classes(hlo_text: str) -> dict[str, str]:
    """{instruction name: class} for every instruction of a compiled program's text."""
    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        op_name, target = _OP_NAME.search(line), _TARGET.search(line)
        out[name] = classify(opcode, op_name.group(1) if op_name else "", target.group(1) if target else "")
    return out


def trace_events(trace_file: Path) -> list[dict]:
    """The timed events of a Perfetto `*.trace.json.gz` that name an HLO instruction."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def summarize(trace_file: Path, hlo_text: str, module: str | None = None) -> dict[str, dict]:
    """{class: {"seconds", "share", "ops"}} of the trace's device time (of HLO module `module` only,
    when given: a trace may hold other programs). An instruction the text does not name is "other"."""
    classes = op_classes(hlo_text)
    seconds, counts = collections.Counter(), collections.Counter()
    for event in trace_events(trace_file):
        if module and event["args"].get("hlo_module") != module:
            continue
        kind = classes.get(event["args"]["hlo_op"], "other")
        seconds[kind] += event["dur"] * 1e-6
        counts[kind] += 1
    total = sum(seconds.values()) or 1.0
    return {kind: {"seconds": seconds[kind], "share": seconds[kind] / total, "ops": counts[kind]} for kind in CLASSES}


def step_module(hlo_text: str) -> str | None:
    """The HLO module's name (`HloModule NAME, ...` on the text's first line)."""
    match = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    return match.group(1) if match else None


def latest_trace(directory: Path) -> Path:
    traces = sorted(Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"No *.trace.json.gz under {directory} (a jax.profiler trace directory)")
    return traces[-1]


def table(summary: dict[str, dict]) -> str:
    lines = ["| class | device time (ms) | share | ops |", "|---|---|---|---|"]
    lines += [f"| {kind} | {row['seconds'] * 1e3:.2f} | {row['share']:.1%} | {row['ops']} |"
              for kind, row in summary.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics_jax.train.profile_summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a profile directory (WORKDIR/profile), or a *.trace.json.gz")
    parser.add_argument("--hlo", help=f"the compiled program's text (default: {HLO_FILE} beside the trace)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.directory)
        trace = path if path.is_file() else latest_trace(path)
        hlo = Path(args.hlo) if args.hlo else next((p / HLO_FILE for p in (trace.parent, *trace.parents)
                                                    if (p / HLO_FILE).exists()), None)
        if hlo is None:
            raise FileNotFoundError(f"No {HLO_FILE} beside {trace}: pass --hlo FILE (the compiled step's text)")
        text = hlo.read_text()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{trace}\n\n{table(summarize(trace, text, step_module(text)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
