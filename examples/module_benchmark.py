"""The `module` row of the family benchmark (issue 12 item 4): a teacher that is not a diffusers model, distilled
exactly as a user distils their own network - the public `ModuleTeacher` + `distill()` API of the README, with the
data handed over as tensors - and measured like every other row.

    python examples/family_benchmark.py --family module --size cpu --output runs/bench   # runs run_module below

Stages, in OUTPUT/module: the teacher (examples/train_family_teacher.py --family module, or --teacher), the run
(`distill(resolve(recipe="recipes/module-fashion-cpu.yaml", ...), teacher=ModuleTeacher(...), data=(images,
labels))`), the evaluation (FD in EfficientNet-Lite0 features against the 10,000 test images and class accuracy,
samples generated for every class equally, through family_teachers/check.py, the function the teacher check uses:
teacher at its default steps and at 2 with its own DDIM sampler, student at 1 and 2 through `load_student`),
batch-1 timing, the class grid, and the export reloaded by `load_student` in a fresh process (same samples).
The evaluation goes through check.py rather than `scm-distill evaluate --teacher` because a module teacher is built
in Python (ModuleTeacher.from_pretrained does not exist); all four numbers are measured the same way, at the same n.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from family_teachers import check
from family_teachers.data import CAPTIONS, fashion_split
from family_teachers.module_family import ddim_samples, fresh_network, load_module, load_module_teacher
from family_teachers.timing import median_ms

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "module-fashion-cpu.yaml"
TOY_RUN = {"train": {"max_steps": 2, "batch_size": 4, "convert_steps": 1, "sample_every": 0, "checkpoint_every": 0},
           "objective": {"compile_jvp": False}, "export": {"checkpoint": "last"}}  # toy: seconds; no monitor
CHECK_BATCH = 100  # samples per sampler call


def distill_module(teacher_dir: Path, out: Path, size_name: str, data_items: int) -> Path:
    """The public API as the README shows it: ModuleTeacher stating what module.json says, distill() on tensors."""
    from scm_distill.config import resolve
    from scm_distill.trainer import distill

    teacher = load_module_teacher(teacher_dir)
    data = fashion_split("train", data_items)
    config = resolve(recipe=str(RECIPE), cli={"teacher": str(teacher_dir), "output": str(out / "run"),
                                              **(TOY_RUN if size_name == "toy" else {})})  # fmt: skip
    print(f"+ distill(resolve(recipe={RECIPE.name!r}), teacher=ModuleTeacher(...), data=(images, labels))", flush=True)
    return distill(config, teacher=teacher, data=(data.images, data.labels)).export_dir


def student_sampler(export: Path, teacher_dir: Path, steps: int):
    from scm_distill import load_student

    pipe = load_student(export, network=fresh_network(teacher_dir)[0])

    def sample(labels: list[int], seed: int) -> torch.Tensor:
        out = pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="np")  # fmt: skip
        return check.to_uint8(out.images)

    return sample, pipe


def evaluate(export: Path, teacher_dir: Path, n: int, cache: Path, reference_items: int | None) -> dict:
    """FD and class accuracy of teacher@default, teacher@2, student@1 and student@2 (check.check, n samples each);
    teacher@default reuses the teacher check when it measured the same n first (same seeds, same samples)."""
    net, spec = load_module(teacher_dir)
    default, scale = spec["default_sampler"]["steps"], spec["default_sampler"]["guidance_scale"]
    info = json.loads((teacher_dir / "teacher_info.json").read_text())
    results = {}
    checked = info.get("check", {})
    if reference_items is None and (checked.get("num_samples") == n or f"fd_{n}" in checked):
        fd = checked["fd"] if checked["num_samples"] == n else checked[f"fd_{n}"]
        results[f"teacher@{default}"] = {"fid": fd, "accuracy": checked["accuracy"], "from": "the teacher check"}
    samplers = {f"teacher@{steps}": lambda labels, seed, steps=steps: ddim_samples(net, spec, labels, seed, steps,
                                                                                   scale)
                for steps in (default, 2) if f"teacher@{steps}" not in results}  # fmt: skip
    for steps in (1, 2):
        samplers[f"student@{steps}"] = student_sampler(export, teacher_dir, steps)[0]
    for name, sample in samplers.items():
        print(f"evaluating {name} ({n} samples)", flush=True)
        result = check.check(sample, n, CHECK_BATCH, cache, None, {"sampler": name}, reference_items)
        results[name] = {"fid": result["fd"], "accuracy": result["accuracy"],
                         "accuracy_per_class": result["accuracy_per_class"]}  # fmt: skip
    return {"results": results, "num_samples": n, "num_reference": reference_items or 10000,
            "feature_extractor": "efficientnet-lite0",
            "teacher_guidance_scale": scale, "class_accuracy": "fashion-mnist"}  # fmt: skip


def timed(sample, repeats: int, network: torch.nn.Module) -> dict:
    """Batch-1 milliseconds of sample([7], seed), end to end and inside the network."""
    return median_ms(lambda seed: sample([7], seed), network, repeats)


def timing(export: Path, teacher_dir: Path, repeats: int) -> dict:
    net, spec = load_module(teacher_dir)
    default, scale = spec["default_sampler"]["steps"], spec["default_sampler"]["guidance_scale"]
    result = {"teacher": {"steps": default, "guidance_scale": scale,
                          **timed(lambda labels, seed: ddim_samples(net, spec, labels, seed, default, scale), repeats,
                                  net)}}  # fmt: skip
    for steps in (2, 1):
        sample, pipe = student_sampler(export, teacher_dir, steps)
        result[f"student_{steps}"] = {"steps": steps, **timed(sample, repeats, pipe.network)}
    for key in ("end_to_end_ms", "network_ms"):
        result[f"speedup_2_step_{key[:-3]}"] = result["teacher"][key] / result["student_2"][key]
    return result


def class_grid(export: Path, teacher_dir: Path, per_class: int, path: Path) -> Path:
    from scm_distill.grids import labelled_rows, save_png

    net, spec = load_module(teacher_dir)
    default, scale = spec["default_sampler"]["steps"], spec["default_sampler"]["guidance_scale"]
    student = student_sampler(export, teacher_dir, 2)[0]
    rows = {}
    for label, caption in enumerate(CAPTIONS):
        labels = [label] * per_class
        teacher = ddim_samples(net, spec, labels, label, default, scale)
        rows[f"{caption}: teacher@{default} | student@2"] = torch.cat([teacher, student(labels, label)])
    save_png(labelled_rows(rows, columns=2 * per_class), path)
    return path


FRESH_PROCESS = """
import sys
import numpy as np
import torch
from scm_distill import load_student
sys.path.insert(0, sys.argv[4])
from family_teachers.module_family import fresh_network
export, teacher, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = load_student(export, network=fresh_network(teacher)[0])
np.save(out_file, pipe(class_labels=list(range(10)), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                       output_type="np").images)
"""


def fresh_process(export: Path, teacher_dir: Path, out: Path) -> dict:
    """The export loaded by load_student into a new instance of the class in a new process: the same samples."""
    import numpy as np

    pipe = student_sampler(export, teacher_dir, 2)[1]
    ours = pipe(class_labels=list(range(10)), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images  # fmt: skip
    script, result = out / "fresh_process.py", out / "fresh_process.npy"
    script.write_text(FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), str(export), str(teacher_dir), str(result),
                           str(Path(__file__).resolve().parent)], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return {"loaded": False, "error": done.stderr.strip().splitlines()[-1:]}
    diff = float(np.abs(np.load(result) - ours).max())
    return {"loaded": True, "loader": "scm_distill.load_student", "samples": len(ours), "max_abs_diff": diff,
            "same": diff <= 1e-5}  # fmt: skip


def run_module(args, root: Path, size: dict, report: dict, done, train_teacher, teacher_minutes) -> dict:
    """The module row's stages; `done(stage, since)` records each (family_benchmark.run_family's bookkeeping)."""
    out = root / "module"
    started = time.time()
    if args.teacher is not None:
        teacher_dir = args.teacher
        report["minutes"]["teacher"] = teacher_minutes(json.loads((teacher_dir / "teacher_info.json").read_text()))
    else:
        teacher_dir = out / "teacher"
        checked = 0 if args.size == "toy" else size["num_samples"]  # the evaluation reuses the check's numbers
        train_teacher(["--family", "module", "--output", str(teacher_dir), "--size", args.size, "--overwrite",
                       *size["teacher"], "--check-samples", str(checked)])  # fmt: skip
        report["minutes"]["teacher"] = round((time.time() - started) / 60, 2)
    info = json.loads((teacher_dir / "teacher_info.json").read_text())
    report["teacher"] = {"folder": str(teacher_dir), "reused": args.teacher is not None, "pipeline": None,
                         **{k: info.get(k) for k in ("network", "parameters", "default_steps", "check",
                                                     "train_minutes")}}  # fmt: skip
    mark = done("teacher", time.time())
    export = distill_module(teacher_dir, out, args.size, size["data_items"])
    mark = done("distill", mark)
    reference_items = None if args.size == "cpu" else 100  # toy: 100 test images, as the latent rows' reference
    report["metrics"] = evaluate(export, teacher_dir, size["num_samples"], root / "reference" / ".fidelity-cache",
                                 reference_items)  # fmt: skip
    mark = done("evaluate", mark)
    report["timing"] = timing(export, teacher_dir, size["repeats"])
    mark = done("timing", mark)
    class_grid(export, teacher_dir, 4, out / "class_grid.png")
    mark = done("grid", mark)
    report["plain_diffusers"] = {"applies": False, "why": "a module export is not a diffusers pipeline; it loads "
                                 "with scm_distill.load_student", "fresh_process": fresh_process(export, teacher_dir,
                                                                                                 out)}  # fmt: skip
    done("plain_diffusers", mark)
    return report
