"""Run on every rank by torchrun from tests/test_distributed.py: `python distributed_runs.py JOBS.json`.

JOBS.json holds a list of {"config": run config dict, "fault_after_step": int or null (run with
TUNESMITH_FAULT_AFTER_STEP set to it), "resume": bool, "copy": [from, to] (rank 0 first copies a run folder, which
the others wait for), "wait_for": a path to wait for (written by the test's own process), "whole_load": bool (FSDP
loads the whole model on every rank and shards it after, as before train/fsdp_load.py)}; the runs go
one after another in the same process group (one launch for many runs keeps the tests cheap). With
"pid_dir" at the top level each rank first writes its pid there, so a test can kill one."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.distributed import leave
from tunesmith.faults import FAULT_AFTER_STEP, SimulatedCrash
from tunesmith.train import fsdp_load
from tunesmith.train.loop import train

SHARDED = fsdp_load.whole_load_reason


def wait_for(path: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def copy_run(source: str, dest: str) -> None:
    if os.environ["RANK"] == "0":
        shutil.copytree(source, dest + ".copying")
        os.rename(dest + ".copying", dest)
    wait_for(Path(dest))


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    if spec.get("pid_dir"):
        Path(spec["pid_dir"], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    for job in spec["jobs"]:
        cfg = load_config(None, [], base=job["config"])
        if job.get("wait_for"):
            wait_for(Path(job["wait_for"]))
        if job.get("copy"):
            copy_run(*job["copy"])
        fsdp_load.whole_load_reason = (lambda cfg, folder: "whole_load (test)") if job.get("whole_load") else SHARDED
        if job.get("fault_after_step") is not None:
            os.environ[FAULT_AFTER_STEP] = str(job["fault_after_step"])
        try:
            train(cfg, quiet=True, resume=job.get("resume", False))
        except SimulatedCrash:
            pass
        finally:
            os.environ.pop(FAULT_AFTER_STEP, None)
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
