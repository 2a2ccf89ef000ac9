"""Command line: score a checkpoint on question/answer data.

    python -m idefics_jax.evaluate --checkpoint DIR --data DIR_OR_JSONL [--output report.json]

DIR is a Hugging Face Idefics2 directory, an idefics_jax checkpoint or a training workdir; the
data is conversations in any format of `idefics_jax.data` (a jsonl, for example the synthetic
set's `conversations_eval/`; ArrayRecord files; a TFDS build). Prints exact match, VQA accuracy
and ANLS and writes a JSON report with every question's prediction. A question that cannot be
asked (an unreadable image, a prompt longer than the context) is named and left out of the
scores (the report counts it in `failed`). A batch that runs out of device memory is answered
in halves. Results are saved as they come (`OUTPUT.partial.jsonl`):
run the same command again after a stop and it goes on from there. The data, a training workdir
and the output may be gs://bucket/... URLs.

On several hosts (`launch/gpu_multihost.sh`, a TPU pod) every process runs the same command: each
batch is generated once on the mesh that spans them (`--mesh`; by default data parallel over the
processes, tensor parallel within each), and process 0 writes the report and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from idefics_jax.cli.common import USER_ERRORS, add_device_arguments, add_split_argument, open_model, start
from idefics_jax.inference.assistant import Assistant
from idefics_jax.inference.evaluate import ProgressFile, evaluate_records, load_records, summarize
from idefics_jax.paths import as_path, is_url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m idefics_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face directory, idefics_jax checkpoint or workdir")
    p.add_argument("--data", required=True, help="a jsonl of conversations, or a directory with data.jsonl, "
                   ".array_record files or a TFDS build (idefics_jax.data's formats)")
    p.add_argument("--output", default="eval_report.json", help="where the JSON report goes (a path or gs://...)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=16)
    add_split_argument(p)
    p.add_argument("--tokenizer", help="a sentencepiece .model or a tokenizer.json (default: the checkpoint's)")
    add_device_arguments(p)
    args = p.parse_args(argv)

    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    try:
        mesh = start(args)
        output = as_path(args.output, "--output")  # a bucket that cannot be written is named before the work
        records, base_dir = load_records(args.data, args.limit)
        loaded = open_model(args, mesh)
        main_process = jax.process_index() == 0  # every process generates; process 0 saves and prints
        progress, done, skip = resume(args, loaded.description, records, main_process)
        began = time.perf_counter()
        report = evaluate_records(Assistant(loaded, dtype=jnp.dtype(args.dtype), mesh=mesh), records[skip:], base_dir,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, split=args.split,
                                  progress=main_process, on_batch=progress.append if main_process else None)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    report = {"checkpoint": loaded.description, "data": str(args.data), "seconds": time.perf_counter() - began,
              "processes": jax.process_count(), "devices": 1 if mesh is None else mesh.size,
              **summarize(done + report["results"])}
    for number, result in enumerate(report["results"], 1):
        if "error" in result:
            name = repr(result["id"]) if result["id"] is not None else f"number {number}"
            print(f"warning: question {name} was not scored: {result['error']}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    if is_url(output):
        output.write_text(json.dumps(report, indent=1))  # a Cloud Storage object is replaced whole
    else:
        output.with_name(output.name + ".tmp").write_text(json.dumps(report, indent=1))
        output.with_name(output.name + ".tmp").replace(output)  # a whole report or the old one, never half
    progress.remove()
    failed = f" ({report['failed']} not scored)" if report["failed"] else ""
    print(f"{report['n']} questions{failed}: exact match {report['exact_match']:.1%}, VQA accuracy "
          f"{report['vqa_accuracy']:.1%}, ANLS {report['anls']:.3f} -> {args.output}")
    return 0


def resume(args, checkpoint: str, records, main_process: bool):
    """(the progress file, the results a stopped run with the same settings saved there, how many
    questions they answer). Process 0 reads the file and tells the others how many to skip; the
    file is started over with the results kept."""
    path = args.checkpoint if is_url(args.checkpoint) else str(Path(args.checkpoint).resolve())
    settings = {"checkpoint": checkpoint, "path": path,
                "records": records.fingerprint(),
                **{k: getattr(args, k) for k in ("tokenizer", "batch_size", "max_new_tokens", "split", "dtype")}}
    progress = ProgressFile(f"{args.output}.partial.jsonl", settings, args.batch_size)
    done = progress.done() if main_process else []
    skip = len(done) if jax.process_count() == 1 else int(multihost_utils.broadcast_one_to_all(len(done)))
    if main_process:
        progress.start(done)
        if done:
            print(f"Going on from {progress.path}: {len(done)} of {len(records)} questions answered before",
                  file=sys.stderr)
    return progress, done, skip


if __name__ == "__main__":
    sys.exit(main())
