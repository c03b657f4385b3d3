"""Run by tests/test_trainer.py under torchrun (2 CPU processes, gloo): distill, then save this rank's weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from scm_distill.config import resolve
from scm_distill.trainer import distill

teacher, output, dump = sys.argv[1:4]
config = resolve(cli={"teacher": teacher, "output": output, "data": {"spec": "digits"},
                      "train": {"max_steps": 2, "convert_steps": 0, "batch_size": 4, "sample_every": 0,
                                "checkpoint_every": 0, "log_every": 1}})  # fmt: skip
result = distill(config)
weights = {k: v.contiguous() for k, v in result.student.state_dict().items()}
save_file(weights, Path(dump) / f"rank{torch.distributed.get_rank()}.safetensors")
