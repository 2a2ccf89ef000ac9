"""The CPU grid's base (configs/ablations/cpu.py): the tiny run on a mix with the held-out tasks that
tell the design choices apart (idefics_jax/data/synthetic_tasks.py), scored per task.

    python -m idefics_jax.train --config configs/ablations/base_cpu.py --workdir /tmp/ablation_base
"""

import importlib.util
from pathlib import Path


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parents[1] / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _tiny()
    edges = dict(longest_edge=112, shortest_edge=28, split_probability=0.0, max_length=512)
    c.data.sources = {
        "tasks": dict(path="tasks", weight=0.6, **edges),
        "conversations": dict(path="conversations", weight=0.2, **edges),
        "pairs": dict(path="pairs", weight=0.1, **edges),
        "interleaved": dict(path="interleaved", weight=0.1, **edges),
    }
    c.data.eval_source = "tasks_eval"
    c.train.eval_samples = 300  # all of them: 50 questions of each of the 6 tasks
    return c
