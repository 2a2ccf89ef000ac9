"""Command line: convert between Hugging Face Idefics2 checkpoints and ours.

    python -m idefics_jax.convert from-hf HF_DIR CKPT_DIR [--dtype bfloat16]
    python -m idefics_jax.convert to-hf CKPT_DIR HF_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

`from-hf` writes an orbax checkpoint (`CKPT_DIR/params`) and `CKPT_DIR/config.json`; `to-hf`
writes sharded safetensors, `model.safetensors.index.json` and `config.json`, which
transformers' `Idefics2ForConditionalGeneration.from_pretrained` loads. Both copy the
tokenizer (`tokenizer.model`) and the processor settings (`preprocessor_config.json`,
`processor_config.json`) when the source has them. Either directory may be a gs://bucket/... URL.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from idefics_jax.checkpoints import (ParamsReader, copy_processor_files, load_hf_checkpoint, save_checkpoint,
                                     save_hf_checkpoint)
from idefics_jax.models.quantize import quantize_params
from idefics_jax.paths import as_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-hf", help="Hugging Face directory -> idefics_jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store parameters in this dtype (default: as stored in the Hugging Face files)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="store every projection as int8 weights with per-channel scales (for generate, evaluate "
                        "and serve; the Hugging Face export needs the float checkpoint)")
    p = sub.add_parser("to-hf", help="idefics_jax checkpoint -> Hugging Face directory")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="write tensors in this dtype (default: the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a directory that is not empty (an earlier export's shards are removed)")
    args = parser.parse_args(argv)

    start = time.time()
    try:
        if args.command == "from-hf":
            # onto the host's CPU device: saving then copies it out a bounded amount at a time
            config, params = load_hf_checkpoint(args.hf_dir, dtype=args.dtype, device=jax.devices("cpu")[0],
                                                progress=True)
            if args.quantize:
                params = quantize_params(params, args.quantize)
            save_checkpoint(args.ckpt_dir, config, params)
            copy_processor_files(args.hf_dir, args.ckpt_dir)
            print(f"Wrote {args.ckpt_dir} ({_count(params):,} parameters) in {time.time() - start:.1f}s")
        else:
            out = as_path(args.hf_dir, "Hugging Face directory")
            if not args.overwrite and out.is_dir() and any(out.iterdir()):
                raise FileExistsError(f"{args.hf_dir} is not empty; choose an empty directory, or pass --overwrite to "
                                      "replace the checkpoint in it")
            reader = ParamsReader(args.ckpt_dir)  # read a group of arrays at a time while writing
            save_hf_checkpoint(args.hf_dir, reader.config, reader, dtype=args.dtype,
                               max_shard_size=args.max_shard_size, progress=True)
            copy_processor_files(args.ckpt_dir, args.hf_dir)
            print(f"Wrote {args.hf_dir} ({_count(reader.shapes):,} parameters) in {time.time() - start:.1f}s")
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # CheckpointError, ConfigError, bad URLs
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


if __name__ == "__main__":
    sys.exit(main())
