"""`scm-distill bench`: sampling speed, training cost and their scaling, side by side in one run.

- sampling: latency at batch 1 and throughput at a large batch; the teacher's own sampler at its default steps
  against the student at 1 and 2 steps; network time (toolkit samplers) and end to end (the pipelines'
  default calls, decoding and post-processing included, through export.call: prompts for text-to-image);
- training: a plain diffusion step of the student's network against one sCD step, broken into its parts
  (evaluation.cost), peak memory, ratios;
- scaling: the training table over resolution and width of a UNet2DModel family, so growth is visible.
Only UNet2D students are read back as models; the other exports (SD, SDXL, DiT, SD3, FLUX, Sana, EDM) get the
end-to-end sampling rows and the scaling table, and bench.json says why there is no training table (for their
networks: `python -m scm_distill.evaluation.cost`). CPU runs are small by default. Writes bench.json and PNG plots.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..export.call import PipelineSampler
from ..export.contract import DESCRIPTION_FILE, read_description
from ..export.load import UntrustedCodeError
from ..families import Teacher, load_teacher
from ..files import check_writable_folder
from ..progress import tracked
from .cost import CostCase, finite_difference_error, training_cost, unet2d_case
from .speed import sampling_speed
from .timing import measure


@dataclass(frozen=True)
class BenchSettings:
    teacher_steps: int = 100  # the teacher's default sampler steps
    throughput_batch: int | None = None  # default: 256 on GPU, 64 on CPU
    train_batch: int | None = None  # default: 128 on GPU, 16 on CPU
    resolutions: tuple[int, ...] | None = None  # default: 16-128 on GPU, 16-64 on CPU
    widths: tuple[int, ...] | None = None  # default: 64-256 on GPU, 16-64 on CPU
    repeats: int = 3
    scaling: bool = True
    prompt: str = "a photograph of a cat"  # text-to-image pipelines are timed on this prompt
    trust_remote_code: bool = False  # run Python code shipped in the export's / teacher's folder (its own pipeline)
    network: str | None = None  # module exports: FILE.py:NAME of the network they load into (export/call.py)


def export_times(folder: Path) -> tuple[float, float]:
    """(t_max, t_mid) of an export's 2-step sampler, from its description."""
    description = read_description(folder)
    if description is None:
        raise UserError(f"'{folder}' has no {DESCRIPTION_FILE}; it is not an scm-distill export.")
    t_max, t_mid = description.times["2"]
    return t_max, t_mid


def end_to_end_ms(folder: str | Path, batch_size: int, steps: int, device: torch.device, repeats: int,
                  prompt: str, trust_remote_code: bool = False, network: str | None = None) -> float:  # fmt: skip
    """Median time of a pipeline's own call (what a user times), output as tensors; text-to-image pipelines are
    called with `prompt`."""
    sampler = PipelineSampler(folder, device=device, default_prompt=prompt, trust_remote_code=trust_remote_code,
                              network=network)  # fmt: skip
    return measure(lambda: sampler(batch_size, steps), device, warmup=1, repeats=repeats).median_ms


def readable_export(model: Path, device: torch.device, trust_remote_code: bool) -> tuple[Teacher | None, str | None]:
    """The export read back by its family adapter (UNet2D students are a DDPMPipeline), or None and why not (a
    refusal of its code is raised)."""
    description = read_description(model)
    if description is None or description.family != "unet2d-vp":
        return None, "only UNet2D students are read back as a model"
    try:
        return load_teacher(str(model), device=device, trust_remote_code=trust_remote_code), None
    except UntrustedCodeError:
        raise
    except ValueError as error:
        return None, str(error)


def sampling_table(model: Path, student: Teacher | None, teacher: str | None, settings: BenchSettings,
                   device: torch.device) -> dict:  # fmt: skip
    big = settings.throughput_batch or (256 if device.type == "cuda" else 64)
    table: dict = {"throughput_batch": big}
    trust = settings.trust_remote_code
    if teacher is None:  # the student alone (e.g. a module export, whose teacher is no pipeline folder)
        table["student_end_to_end_batch1"] = {
            f"student_{n}_step_ms": end_to_end_ms(model, 1, n, device, settings.repeats, settings.prompt, trust,
                                                  settings.network)
            for n in (1, 2)}  # fmt: skip
        return table
    teacher_e2e = end_to_end_ms(teacher, 1, settings.teacher_steps, device, settings.repeats, settings.prompt, trust)
    student_e2e = end_to_end_ms(model, 1, 2, device, settings.repeats, settings.prompt, trust)
    print("bench: timing the teacher's and the student's pipelines end to end", file=sys.stderr)
    table["end_to_end_batch1"] = {"teacher_ms": teacher_e2e, "student_2_step_ms": student_e2e,
                                  "speedup_2_step": teacher_e2e / student_e2e}  # fmt: skip
    if student is None:
        return table
    t_max, t_mid = export_times(model)
    reference = load_teacher(teacher, device=device, trust_remote_code=settings.trust_remote_code)
    for batch in (1, big):
        row = sampling_speed(reference.model, student.model, student.sample_shape, settings.teacher_steps, t_max,
                             t_mid, batch_size=batch, device=device, repeats=settings.repeats)  # fmt: skip
        row["teacher_images_per_s"] = batch / row["teacher_ms"] * 1000
        row["student_2_step_images_per_s"] = batch / row["student_2_step_ms"] * 1000
        table[f"network_batch{batch}"] = row
    return table


def scaling_cases(settings: BenchSettings, device: torch.device) -> list[CostCase]:
    gpu = device.type == "cuda"
    resolutions = settings.resolutions or ((16, 32, 64, 128) if gpu else (16, 32, 64))
    widths = settings.widths or ((64, 128, 256) if gpu else (16, 32, 64))
    batch = 32 if gpu else 4
    base = widths[len(widths) // 2]
    cases = [unet2d_case(f"resolution {r}px, width {base}", r, (base, 2 * base, 2 * base), (1,), 1, batch,
                         groups=min(32, base)) for r in resolutions]  # fmt: skip
    cases += [unet2d_case(f"resolution 32px, width {w}", 32, (w, 2 * w, 2 * w), (1,), 1, batch, groups=min(32, w))
              for w in widths]  # fmt: skip
    return cases


def bench(model: Path, output: Path, teacher: str | None = None, settings: BenchSettings = BenchSettings()) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_writable_folder(output, "--output")
    student, unreadable = readable_export(model, device, settings.trust_remote_code)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "model": str(model), "teacher": teacher,
               "sampling": sampling_table(model, student, teacher, settings, device),
               "training": [], "finite_difference": []}  # fmt: skip
    if student is None:
        results["note"] = (f"end-to-end sampling only: the export is not read back as a model ({unreadable}); "
                           f"training cost: python -m scm_distill.evaluation.cost")  # fmt: skip
    else:
        train_batch = settings.train_batch or (128 if device.type == "cuda" else 16)
        case = CostCase("exported student network", lambda: copy.deepcopy(student.model.network),
                        student.model.network_call, student.sample_shape, train_batch,
                        lambda B, d: {})  # fmt: skip
        precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
        results["training"] = [training_cost(case, device, p, repeats=settings.repeats)
                               for p in tracked(precisions, "timing the sCD step", unit="precision")]  # fmt: skip
        results["finite_difference"] = [finite_difference_error(case, device, p) for p in precisions]
    if settings.scaling:
        precision = "bf16" if device.type == "cuda" else "fp32"
        results["scaling"] = [training_cost(c, device, precision, repeats=settings.repeats)
                              for c in tracked(scaling_cases(settings, device), "timing the scaling table",
                                               unit="size")]  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_bench(results, output)
    return results


def plot_bench(results: dict, output: Path) -> None:
    """training.png (sCD step parts against a diffusion step) and scaling.png, for the tables that were measured."""
    import matplotlib

    matplotlib.use("Agg")
    if results["training"]:
        plot_training(results["training"], output / "training.png")
    if results.get("scaling"):
        plot_scaling(results["scaling"], output / "scaling.png")


def plot_training(records: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    parts = ["teacher_forward", "jvp", "student_forward_backward", "optimizer_step"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, record in enumerate(records):
        bottom = 0.0
        for part in parts:
            ms = record["timings"][part]["median_ms"]
            ax.bar(i, ms, bottom=bottom, label=part if i == 0 else None)
            bottom += ms
        ax.bar(i + 0.4, record["timings"]["diffusion_step"]["median_ms"], width=0.3, color="grey",
               label="diffusion step" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(records)), [r["precision"] for r in records])
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # outside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_scaling(records: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["case"] for r in records]
    ax.plot(names, [r["scd_over_diffusion"] for r in records], marker="o", label="sCD / diffusion")
    ax.plot(names, [r["jvp_over_forward"] for r in records], marker="s", label="JVP / forward")
    ax.tick_params(axis="x", rotation=60, labelsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
