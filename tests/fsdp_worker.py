"""Run by tests/test_parallel.py under torchrun (2 CPU processes, gloo): the distillation jobs of a JSON file, in
order, each {"config": resolve(cli=...) arguments, "resume": null | "latest", "kill_rank_at": null | [rank, folder
name]}. `kill_rank_at` SIGKILLs that rank while DCP writes that checkpoint's shards (a crash mid-checkpoint)."""

import json
import os
import signal
import sys

import torch.distributed.checkpoint as dcp

from scm_distill.config import resolve
from scm_distill.trainer import distill


def kill_while_writing(rank: int, folder: str) -> None:
    write = dcp.HuggingFaceStorageWriter.write_data

    def dying_write(self, plan, planner):
        if int(os.environ["RANK"]) == rank and f".{folder}.tmp" in str(self.path):
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, plan, planner)

    dcp.HuggingFaceStorageWriter.write_data = dying_write


for job in json.loads(open(sys.argv[1]).read()):
    if job.get("kill_rank_at"):
        kill_while_writing(*job["kill_rank_at"])
    distill(resolve(cli=job["config"]), resume=job.get("resume"))
