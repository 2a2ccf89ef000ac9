"""A `jax.profiler` trace read per op class: where a step's device time goes.

    python -m idefics_jax.train.profile_summary WORKDIR/profile

Every op the trace times names its HLO module and instruction (`hlo_module`, `hlo_op`); the
compiled program's text (saved beside the trace as `step.hlo.txt` by the training loop's profiler,
or dumped by XLA: `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`, `--hlo DIR`) says what
that instruction is:
its opcode, its custom-call target and the JAX source path it came from (`op_name`, which carries
the Flax module path and the named scopes `attention` and `optimizer`). Each op is put in one class:

    collectives  all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
    copies       copy, transpose, dtype conversions (XLA:CPU converts bfloat16 weights for its
                 products), dynamic-update-slice (a decode step's KV-cache writes), and the host
                 offloads' copy-start / done
    optimizer    anything under the train step's `optimizer` scope (AdamW, clipping, the update)
    sampling     anything under generation's `sampling` scope (logit filters, the token's choice)
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

CLASSES = ("matmuls", "attention", "norms", "optimizer", "sampling", "copies", "collectives", "other")
HLO_FILE = "step.hlo.txt"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COPIES = ("copy", "copy-start", "copy-done", "transpose", "dynamic-update-slice")
_NORM = re.compile(r"(^|/)[\w]*(norm|layernorm|layer_norm)[\w]*(/|$)", re.IGNORECASE)
_ATTENTION_KERNELS = re.compile(r"triton|mosaic|fmha|flash|splash|tpu_custom_call", re.IGNORECASE)
_GEMM = re.compile(r"gemm|cublas|matmul", re.IGNORECASE)


def classify(opcode: str, op_name: str = "", target: str = "", name: str = "") -> str:
    """The class of one HLO instruction named `name` (see the module docstring)."""
    base = opcode.removesuffix("-start").removesuffix("-done")
    if base in _COLLECTIVES:
        return "collectives"
    if opcode in _COPIES or opcode == "convert" or name.startswith("wrapped_convert"):
        return "copies"
    for scope in ("optimizer", "sampling"):
        if f"/{scope}/" in f"/{op_name}/":
            return scope
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
        out[name] = classify(opcode, op_name.group(1) if op_name else "", target.group(1) if target else "", name)
    return out


def trace_events(trace_file: Path) -> list[dict]:
    """The timed events of a Perfetto `*.trace.json.gz` that name an HLO instruction."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def summarize(trace_file: Path, programs: dict[str, str]) -> dict[str, dict]:
    """{class: {"seconds", "share", "ops"}} of the trace's device time in the programs `programs`
    ({HLO module name: its compiled text}; a trace also times other, small programs: left out)."""
    classes = {module: op_classes(text) for module, text in programs.items()}
    seconds, counts = collections.Counter(), collections.Counter()
    for event in trace_events(trace_file):
        module = event["args"].get("hlo_module")
        if module not in classes:
            continue
        kind = classes[module].get(event["args"]["hlo_op"], "other")
        seconds[kind] += event["dur"] * 1e-6
        counts[kind] += 1
    total = sum(seconds.values()) or 1.0
    return {kind: {"seconds": seconds[kind], "share": seconds[kind] / total, "ops": counts[kind]} for kind in CLASSES}


def module_name(hlo_text: str) -> str:
    """The HLO module's name (`HloModule NAME, ...` on the text's first line)."""
    match = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    if not match:
        raise ValueError("not the text of a compiled HLO module (it starts with `HloModule NAME`)")
    return match.group(1)


def read_programs(paths) -> dict[str, str]:
    """{module name: text} of compiled programs' text files, or of the directories XLA dumped them to
    (`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`: their `*after_optimizations.txt`)."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*after_optimizations.txt")) if path.is_dir() else [path]
    texts = [f.read_text() for f in files]
    return {module_name(text): text for text in texts}


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
    parser.add_argument("--hlo", action="append", default=[],
                        help=f"a compiled program's text, or a directory XLA dumped programs to (--xla_dump_to); "
                             f"repeatable (default: {HLO_FILE} beside the trace, as training saves it)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.directory)
        trace = path if path.is_file() else latest_trace(path)
        hlo = args.hlo or [p / HLO_FILE for p in (trace.parent, *trace.parents) if (p / HLO_FILE).exists()][:1]
        if not hlo:
            raise FileNotFoundError(f"No {HLO_FILE} beside {trace}: pass --hlo FILE or DIR (the programs' text)")
        programs = read_programs(hlo)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{trace}, programs {sorted(programs)}\n\n{table(summarize(trace, programs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
