"""Run on every rank by torchrun from tests/test_distributed.py: `python distributed_runs.py JOBS.json`.

JOBS.json holds a list of {"config": run config dict, "crash_after_step": int or null, "resume": bool}; the runs go
one after another in the same process group (one launch for many runs keeps the tests cheap). With
"pid_dir" at the top level each rank first writes its pid there, so a test can kill one."""

import json
import os
import sys
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.distributed import leave
from tunesmith.train.loop import SimulatedCrash, train


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    if spec.get("pid_dir"):
        Path(spec["pid_dir"], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    for job in spec["jobs"]:
        cfg = load_config(None, [], base=job["config"])
        try:
            train(cfg, quiet=True, resume=job.get("resume", False), crash_after_step=job.get("crash_after_step"))
        except SimulatedCrash:
            pass
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
