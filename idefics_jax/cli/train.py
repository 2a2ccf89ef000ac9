"""Command line: train Idefics2 from an ml_collections config.

    python -m idefics_jax.train --config configs/tiny.py --workdir /tmp/idefics_tiny [--config.train.steps=50]
    python -m idefics_jax.train --plot --workdir /tmp/idefics_tiny          # loss curve -> WORKDIR/loss.png

Run the same command again to resume from the latest checkpoint in WORKDIR. On several hosts,
start it on each (see launch/): `--coordinator`, `--num_processes`, `--process_id` or the
environment (Cloud TPU, Slurm) set up `jax.distributed`.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from idefics_jax.checkpoints.workdir import export_hf
from idefics_jax.cli.common import USER_ERRORS
from idefics_jax.distributed import initialize
from idefics_jax.host_memory import reuse_freed_memory_on_cpu
from idefics_jax.inference.evaluate import training_evaluation
from idefics_jax.train.loop import train
from idefics_jax.train.metrics import plot_loss
from idefics_jax.train.preemption import EXIT_CODE

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and generated data", required=True)
flags.DEFINE_bool("plot", False, "Plot WORKDIR's loss curve to WORKDIR/loss.png and exit")
flags.DEFINE_string("export_hf", None, "Write WORKDIR's latest checkpoint (LoRA/DoRA merged), its tokenizer and "
                    "image sizes as a Hugging Face directory (may be gs://) and exit; on every host of a multi-host run")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-host runs")
flags.DEFINE_integer("num_processes", None, "number of processes (hosts) in a multi-host run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every step at INFO
    logging.getLogger().handlers.clear()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("idefics_jax").setLevel(logging.INFO)
    if FLAGS.plot:
        print(f"Wrote {plot_loss(FLAGS.workdir)}")
        return 0
    if FLAGS.config is None:
        sys.exit("error: --config is required (for example --config configs/tiny.py)")
    reuse_freed_memory_on_cpu()  # before XLA starts its threads
    try:
        initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        if FLAGS.export_hf:
            step = export_hf(FLAGS.workdir, FLAGS.export_hf)
            print(f"Exported step {step} of {FLAGS.workdir} to {FLAGS.export_hf}")
            return 0
        result = train(FLAGS.config, FLAGS.workdir, evaluation=training_evaluation)
    except USER_ERRORS as error:  # a mistake in the config, the data or a path: one line, nothing lost
        sys.exit(f"error: {error}")
    if result["preempted_at"] is not None:
        print(f"Stopped at step {result['preempted_at']} on a preemption notice (SIGTERM); its checkpoint is saved: "
              f"run the same command to resume")
        return EXIT_CODE  # not finished: schedulers that retry failed jobs start it again
    history = result["history"]
    if history:
        print(f"Trained to step {history[-1][0]}: loss {history[0][1]:.3f} -> {history[-1][1]:.3f}; "
              f"data: {result['data_summary']}")
    if result.get("eval"):
        report = result["eval"]
        print(f"Exact match on {report['n']} held-out questions: {report['exact_match']:.1%} "
              f"(e.g. {report['results'][0]['answer']!r} -> {report['results'][0]['prediction']!r})")
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a config override that names no key (a typo) reported on one line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}")
    except (AttributeError, KeyError) as error:  # ml_collections: the key and its likely spelling
        inner = error.args[0] if error.args else error
        text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
        sys.exit(f"error: no such config key {' '.join(str(text).split())} (in the --config.* overrides)")


if __name__ == "__main__":  # as `python -m idefics_jax.train` runs it
    app.run(main, flags_parser=parse_flags)
