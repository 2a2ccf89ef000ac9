"""Run by test_conversion.py: one `python -m idefics_jax.convert` command in this process, after a
warm-up conversion of a tiny model (imports, thread pools, caches: the runtime's constant), and the
resident memory the command added at its peak over what the process held before it.

    python convert_memory.py WARMUP_HF_DIR from-hf|to-hf SOURCE DESTINATION [READ_GROUP]

READ_GROUP: the bytes `to-hf` reads at once (`idefics_jax.checkpoints.params.READ_GROUP`).
"""

import json
import sys
import tempfile
from pathlib import Path

from idefics_jax.checkpoints import params
from idefics_jax.cli.convert import main


def memory(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))


if __name__ == "__main__":
    warmup, command, source, destination = sys.argv[1:5]
    if len(sys.argv) > 5:
        params.READ_GROUP = int(sys.argv[5])
    with tempfile.TemporaryDirectory() as scratch:  # the tiny model both ways, as the command runs
        assert main(["from-hf", warmup, str(Path(scratch) / "ours")]) == 0
        assert main(["to-hf", str(Path(scratch) / "ours"), str(Path(scratch) / "hf")]) == 0
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident
    before = memory("VmRSS")
    assert main([command, source, destination]) == 0
    print(json.dumps({"added": memory("VmHWM") - before}))
