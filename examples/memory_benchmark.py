"""Memory at toy size on the CPU (the embedded digits teacher, 1.1M parameters, 16x16, batch 64), measured:

1. per-rank parameter + optimizer + EMA bytes under FSDP on 2 processes (gloo) against DDP's (every rank whole);
2. the frozen teacher per rank: replicated in float32, replicated in bf16, sharded;
3. the peak allocated memory of the gradient pass (student forward with grad + backward) with and without
   activation checkpointing, and of the JVP pass, in one process;
4. the plan's estimate (`scm-distill plan`, scm_distill/plan.py) against the measured peak of a whole sCD step.

Peaks are allocator-level (scm_distill/memory.py: the profiler's allocation events, the CPU analogue of
torch.cuda.max_memory_allocated): the same model, inputs and seeds in both settings, nothing else allocating, so
a difference is the setting's own. State bytes are the distinct storages of the tensors each rank holds.

    python examples/memory_benchmark.py --output examples/results/memory-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from scm_distill.attention import jvp
from scm_distill.config import resolve
from scm_distill.demo import DEMO_TEACHER
from scm_distill.ema import EMA
from scm_distill.families import load_teacher
from scm_distill.memory import optimizer_tensors, peak_allocated_bytes, storage_bytes
from scm_distill.objective import SCDLoss, noisy_batch
from scm_distill.optim import make_optimizer
from scm_distill.parallel import Sharding, enable_activation_checkpointing
from scm_distill.plan import memory_plan
from scm_distill.trainer import make_student

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "digits-demo.yaml"
BATCH = 64  # the demo recipe's batch


def setup(checkpointing: bool = False):
    # MATH attention in the JVP, as when examples/results/memory-cpu.json was measured (CPU runs now take the
    # blocked kernel by default, which holds a block of logits instead of the batch's)
    config = resolve(str(RECIPE), {"teacher": str(DEMO_TEACHER), "output": "unused", "objective": {"attention": "math"},
                                   "train": {"activation_checkpointing": checkpointing}})  # fmt: skip
    teacher = load_teacher(str(DEMO_TEACHER))
    teacher.configure(config)
    torch.manual_seed(0)
    student = make_student(config, teacher)
    return config, teacher, student


def batch(teacher, seed: int = 0) -> torch.Tensor:
    return torch.rand((BATCH, *teacher.sample_shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def scd_step(config, teacher, student, ema, optimizer, step: int) -> None:
    loss, _ = SCDLoss(teacher.model, config.objective)(student, student, batch(teacher, step), {}, step,
                                                       torch.Generator().manual_seed(step))  # fmt: skip
    loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(student, 0.99)


def state_bytes(student, ema, optimizer, teacher) -> dict[str, int]:
    return {"parameters": storage_bytes(student.parameters()), "optimizer": storage_bytes(optimizer_tensors(optimizer)),
            "ema": storage_bytes(ema.module.parameters()),
            "teacher": storage_bytes(teacher.model.network.parameters())}  # fmt: skip


def worker(folder: Path) -> None:
    """Under torchrun: one step replicated (DDP holds the same tensors as one process) and one step sharded."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {}
    for layout in ("ddp", "fsdp"):
        config, teacher, student = setup()
        ema = EMA(student)
        if layout == "fsdp":
            Sharding(torch.device("cpu"), world, "no").shard(student, ema.module, teacher.model.network)
        optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], config.optim)
        scd_step(config, teacher, student, ema, optimizer, step=0)
        out[layout] = state_bytes(student, ema, optimizer, teacher)
        if layout == "ddp":
            out["teacher_bf16"] = storage_bytes(copy.deepcopy(teacher.model.network).to(torch.bfloat16).parameters())
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


def sharded_state(output: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
               __file__, "--worker", tmp]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    keys = ("parameters", "optimizer", "ema")
    for rank, measured in enumerate(ranks):
        ddp, fsdp = (sum(measured[layout][k] for k in keys) for layout in ("ddp", "fsdp"))
        output[f"rank{rank}"] = {**measured, "parameters_optimizer_ema": {"ddp": ddp, "fsdp": fsdp,
                                                                          "fsdp_over_ddp": round(fsdp / ddp, 4)}}
    return output


def pass_peaks(checkpointing: bool) -> dict[str, int]:
    """Peak allocated bytes of the gradient pass and of the JVP pass (exact JVP, MATH attention on the CPU)."""
    config, teacher, student = setup(checkpointing)
    if checkpointing:
        enable_activation_checkpointing(student.network)
    t, x_t = noisy_batch(batch(teacher), config.objective, teacher.model, torch.Generator().manual_seed(1))

    def gradient_pass():
        F_theta, logvar = student(x_t, t, {})
        (F_theta.square().mean() + logvar.mean()).backward()

    def jvp_pass():
        with torch.no_grad():
            jvp(lambda x, tt: student.F(x, tt, {}), (x_t, t), (torch.ones_like(x_t), torch.ones_like(t)),
                attention=config.objective.attention)

    return {"gradient_pass_peak": peak_allocated_bytes(gradient_pass), "jvp_pass_peak": peak_allocated_bytes(jvp_pass)}


def gradient_pass_peaks(output: dict) -> dict:
    output["no_checkpointing"], output["activation_checkpointing"] = pass_peaks(False), pass_peaks(True)
    off, on = output["no_checkpointing"]["gradient_pass_peak"], output["activation_checkpointing"]["gradient_pass_peak"]
    output["checkpointing_over_none"] = round(on / off, 4)
    return output


def plan_check(output: dict) -> dict:
    """The plan's one-process total against the measured peak of the second sCD step (optimizer state exists)."""
    config, teacher, student = setup()
    ema = EMA(student)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], config.optim)
    scd_step(config, teacher, student, ema, optimizer, step=0)
    live = sum(state_bytes(student, ema, optimizer, teacher).values())
    live += storage_bytes([*student.buffers(), *ema.module.buffers(), *teacher.model.network.buffers()])
    peak = live + peak_allocated_bytes(lambda: scd_step(config, teacher, student, ema, optimizer, step=1))
    plan = memory_plan(resolve(str(RECIPE), {"teacher": str(DEMO_TEACHER), "output": "unused"}), processes=1)
    output["measured_step_peak"], output["plan_total"] = peak, plan.total(fsdp=False)
    output["plan_rows"] = plan.rows(fsdp=False)
    output["plan_over_measured"] = round(plan.total(fsdp=False) / peak, 4)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=False)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    torch.set_num_threads(1)
    results = {"torch": torch.__version__, "model": str(DEMO_TEACHER.name), "batch": BATCH}
    results["two_processes"] = sharded_state({})
    results["one_process"] = plan_check(gradient_pass_peaks({}))
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
