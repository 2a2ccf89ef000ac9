"""Command line: score a checkpoint on local question/answer data.

    python -m idefics_jax.evaluate --checkpoint DIR --data DIR_OR_JSONL [--output report.json]

DIR is a Hugging Face Idefics2 directory, an idefics_jax checkpoint or a training workdir; the
data is a jsonl of conversations (the format of `idefics_jax.data`, for example the synthetic
set's `conversations_eval/`). Prints exact match, VQA accuracy and ANLS and writes a JSON report
with every question's prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from idefics_jax.generate import MESH_HELP


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m idefics_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face directory, idefics_jax checkpoint or workdir")
    p.add_argument("--data", required=True, help="a jsonl of conversations, or a directory with data.jsonl")
    p.add_argument("--output", default="eval_report.json", help="where the JSON report goes")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--split", action="store_true", help="320 visual tokens per image (4 crops + whole), not 64")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's)")
    p.add_argument("--mesh", help=MESH_HELP)
    args = p.parse_args(argv)

    from idefics_jax.config import ConfigError
    from idefics_jax.convert import CheckpointError
    from idefics_jax.data.image_processing import ImageError
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.inference.evaluate import evaluate_records, load_records
    from idefics_jax.inference.loading import load_for_inference
    from idefics_jax.sharding import parse_mesh

    try:
        records, base_dir = load_records(args.data, args.limit)
        mesh = parse_mesh(args.mesh) if args.mesh else None
        loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
        start = time.perf_counter()
        report = evaluate_records(Assistant(loaded, mesh=mesh), records, base_dir, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, split=args.split, progress=True)
    except (ValueError, FileNotFoundError, ImageError, CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = {"checkpoint": loaded.description, "data": str(args.data), "seconds": time.perf_counter() - start,
              **report}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"{report['n']} questions: exact match {report['exact_match']:.1%}, VQA accuracy "
          f"{report['vqa_accuracy']:.1%}, ANLS {report['anls']:.3f} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
