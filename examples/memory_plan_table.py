"""The README's memory table: `scm-distill plan` for every recipe at the GPU count and GPU its header names.

    python examples/memory_plan_table.py --output examples/results/memory-plan.json   # also prints the markdown
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scm_distill.config import resolve
from scm_distill.plan import HEADROOM, memory_plan

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# recipe -> (processes, GB per GPU): the launch command in each recipe's header; FLUX names H200-class GPUs
HARDWARE = {"ddpm-cifar10": (4, 80), "sd15": (8, 80), "sd15-lora": (4, 80), "sdxl": (8, 80), "sdxl-lora": (8, 80),
            "edm": (8, 80), "dit": (8, 80), "sd3": (8, 80), "flux": (8, 141), "sana": (8, 80)}  # fmt: skip


def recipe_row(name: str) -> dict:
    processes, gpu_gb = HARDWARE[name]
    config = resolve(str(RECIPES / f"{name}.yaml"), {"output": "plan"})
    plan = memory_plan(config, processes)
    ddp, fsdp = plan.total(fsdp=False) / 1e9, plan.total(fsdp=True) / 1e9
    used = fsdp if config.train.parallel == "fsdp" else ddp
    return {"recipe": name, "processes": processes, "gpu_gb": gpu_gb, "parallel": config.train.parallel,
            "activation_checkpointing": config.train.activation_checkpointing, "batch": config.train.batch_size,
            "resolution": plan.resolution, "trainable": plan.trainable_params, "ddp_gb": round(ddp, 1),
            "fsdp_gb": round(fsdp, 1), "recipe_gb": round(used, 1), "fits": used <= HEADROOM * gpu_gb,
            "activations_per_sample_gb": round(plan.activations_per_sample / 1e9, 2),
            "setup_gb": round(plan.setup_peak() / 1e9, 1)}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | trainable | GPUs | per-GPU batch | DDP per GPU | FSDP per GPU | recipe's setting | fits |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        setting = r["parallel"] + (" + activation checkpointing" if r["activation_checkpointing"] else "")
        lines.append(f"| `{r['recipe']}.yaml` | {r['trainable'] / 1e6:,.0f}M | {r['processes']} x {r['gpu_gb']} GB | "
                     f"{r['batch']} at {r['resolution']} px | {r['ddp_gb']} GB | {r['fsdp_gb']} GB | {setting}: "
                     f"**{r['recipe_gb']} GB** | {'yes' if r['fits'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rows = [recipe_row(name) for name in HARDWARE]
    print(markdown(rows))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
