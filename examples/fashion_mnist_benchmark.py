"""The Fashion-MNIST benchmark: train a teacher, distill it, evaluate both, time both - one command per size.

    python examples/fashion_mnist_benchmark.py --size cpu --output runs/fashion-cpu    # <= 45 min on 2 cores
    python examples/fashion_mnist_benchmark.py --size gpu --output runs/fashion-gpu    # full size, one GPU

Data: Fashion-MNIST (70,000 images, MIT) from the Debian package `dataset-fashion-mnist` offline, or from the
Hub via `datasets` online (scm_distill.data). Quality: FID in the feature space `scm-distill evaluate` picks
(Inception-v3 when its weights are available offline, otherwise EfficientNet-Lite0) against the 10,000 test
images; speed: batch-1 latency of the teacher's default sampler against the student's 2 steps, same run.
Writes OUTPUT/results.json and OUTPUT/results.md (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_teacher import main as train_teacher  # noqa: E402

from scm_distill.config import resolve  # noqa: E402
from scm_distill.evaluation.bench import export_times  # noqa: E402
from scm_distill.evaluation.evaluate import EvalSettings, evaluate  # noqa: E402
from scm_distill.evaluation.speed import sampling_speed  # noqa: E402
from scm_distill.families import load_teacher  # noqa: E402
from scm_distill.trainer import distill  # noqa: E402

# Per size: teacher training flags, the distillation recipe, evaluation sample count.
SIZES = {
    "cpu": {"teacher": ["--resize-to", "16", "--widths", "32,64,64", "--steps", "4000", "--batch-size", "64"],
            "recipe": REPO / "recipes" / "fashion-mnist-cpu.yaml", "num_samples": 2000, "teacher_steps": 100},
    "gpu": {"teacher": ["--pad-to", "32", "--widths", "64,128,256", "--layers-per-block", "2", "--steps", "20000",
                        "--batch-size", "256", "--lr", "1e-3", "--mixed-precision", "bf16"],
            "recipe": REPO / "recipes" / "fashion-mnist.yaml", "num_samples": 10000, "teacher_steps": 100},
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep OUTPUT/teacher if it exists (its recorded training time is reported)")
    parser.add_argument("--reuse-run", action="store_true",
                        help="keep OUTPUT/run if it holds an export (its logged distillation time is reported)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    started = time.time()
    teacher_dir = out / "teacher"
    if args.reuse_teacher and teacher_dir.is_dir():
        timings["teacher_minutes"] = json.loads((teacher_dir / "teacher_info.json").read_text())["train_minutes"]
    else:
        train_teacher(["--data", "fashion-mnist", "--output", str(teacher_dir), "--overwrite", *size["teacher"]])
        timings["teacher_minutes"] = (time.time() - started) / 60

    started = time.time()
    config = resolve(recipe=str(size["recipe"]), cli={"teacher": str(teacher_dir), "output": str(out / "run")})
    export_dir = out / "run" / "pipeline"
    if args.reuse_run and (export_dir / "model_index.json").is_file():
        last = (out / "run" / "log.jsonl").read_text().strip().splitlines()[-1]
        timings["distill_minutes"] = json.loads(last)["seconds"] / 60
    else:
        export_dir = distill(config, overwrite=True).export_dir
        timings["distill_minutes"] = (time.time() - started) / 60

    started = time.time()
    settings = EvalSettings(steps=(1, 2), teacher_steps=(2, size["teacher_steps"]), num_samples=size["num_samples"])
    metrics = evaluate_fashion(export_dir, config, teacher_dir, settings, out)
    timings["evaluate_minutes"] = (time.time() - started) / 60

    teacher, student = load_teacher(str(teacher_dir)), load_teacher(str(export_dir))
    t_max, t_mid = export_times(export_dir)
    speed = sampling_speed(teacher.model, student.model, student.sample_shape, size["teacher_steps"], t_max, t_mid)
    report = {"size": args.size, "machine": machine(), "torch": torch.__version__, **timings,
              "sampling_batch1": speed, "metrics": metrics}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(results_table(report, size["teacher_steps"]))
    print((out / "results.md").read_text())


def evaluate_fashion(export_dir: Path, config, teacher_dir: Path, settings: EvalSettings, out: Path) -> dict:
    """Evaluate against the test split, brought to the training resolution with the training transform and saved
    as an image folder (a folder's images are its one split)."""
    from scm_distill.data import load_images

    test = load_images("fashion-mnist", split="test", resize_to=config.data.resize_to, pad_to=config.data.pad_to)
    folder = out / "reference"
    if not folder.is_dir():  # an image folder, so `scm-distill evaluate --reference` can use it too
        from PIL import Image

        folder.mkdir(parents=True)
        for i, image in enumerate(test.uint8_images()):
            Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")
    return evaluate(export_dir, str(folder), out / "evaluation", str(teacher_dir), settings)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"


def results_table(report: dict, teacher_steps: int) -> str:
    results, space = report["metrics"]["results"], report["metrics"]["feature_extractor"]
    speed = report["sampling_batch1"]
    rows = [(f"teacher, {teacher_steps} steps (DDIM)", f"teacher@{teacher_steps}", speed["teacher_ms"]),
            ("teacher, 2 steps (DDIM)", "teacher@2", None),
            ("student, 2 steps", "student@2", speed["student_2_step_ms"]),
            ("student, 1 step", "student@1", speed["student_1_step_ms"])]  # fmt: skip
    lines = [f"| {label} | {results[key]['fid']:.2f} | {'' if ms is None else f'{ms:.1f}'} |"
             for label, key, ms in rows]  # fmt: skip
    return (f"FID ({space}, {report['metrics']['num_samples']} samples vs {report['metrics']['num_reference']} "
            f"test images) on {report['machine']}:\n\n| sampler | FID | latency, batch 1 (ms) |\n|---|---|---|\n"
            + "\n".join(lines) + f"\n\nTeacher training {report['teacher_minutes']:.1f} min, distillation "
            f"{report['distill_minutes']:.1f} min, evaluation {report['evaluate_minutes']:.1f} min; 2-step sampling "
            f"speedup {speed['speedup_2_step']:.1f}x at batch 1.\n")  # fmt: skip


if __name__ == "__main__":
    main()
