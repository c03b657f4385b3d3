"""The family benchmark (issue 12): a small real-data teacher of one model family, distilled by `scm-distill distill`
with a committed recipe, measured by `scm-distill evaluate` and timed - one command per family.

    python examples/family_benchmark.py --family sd --size cpu --output runs/bench              # teacher trained
    python examples/family_benchmark.py --family sd --size cpu --output runs/bench-sd \
        --teacher /work/runs/teachers/sd --reuse-features                                      # teacher reused
    python examples/family_benchmark.py --family all --size cpu --output runs/bench           # every family

Per family F, in OUTPUT/F: the teacher (examples/train_family_teacher.py, on the
VAE OUTPUT/vae-kl or vae-dc, trained first when missing; or --teacher, which must be of family F and size
--size), the training images as an image folder (train split padded to 32x32, RGB, with the class captions of
family_teachers/data.py in metadata.jsonl; DiT: one subfolder per class), the run (`scm-distill distill --recipe
recipes/F-fashion-cpu.yaml`), the evaluation (`scm-distill evaluate`: FD in EfficientNet-Lite0 features against the
10,000 test images and class accuracy, samples generated for every class equally; teacher at its default steps and
at 2, student at 1 and 2), batch-1 timing (end to end through each pipeline's own call, VAE decode included, and
network-only: the time spent inside the denoiser's calls), a class grid (one row per class, teacher | student), and
the export loaded with plain diffusers in a process that cannot import scm_distill (same samples as the toolkit's).
Writes results.json (rewritten after every stage, so a stopped run keeps what it measured), results.md,
class_grid.png and family-F-SIZE.json (the file committed as examples/results/family-F-cpu.json).
Shared by the families of one OUTPUT: the VAEs, the training image folders, and the test-image folder with its cached
features (OUTPUT/reference; --reuse-features keeps it between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from family_teachers.data import CAPTIONS, MissingDataError, fashion_split  # noqa: E402
from family_teachers.latent_teacher import LATENT_FAMILIES  # noqa: E402
from family_teachers.timing import median_ms  # noqa: E402
from family_teachers.training import machine  # noqa: E402
from train_family_teacher import main as train_teacher  # noqa: E402

from scm_distill.grids import labelled_rows, save_png  # noqa: E402

FAMILIES = (*LATENT_FAMILIES, "module")  # sd, sdxl, dit, sd3, flux, sana, edm; module: examples/module_benchmark.py
SIZES = {  # per size: training images of the run, evaluation samples, timing repeats, run overrides
    "cpu": {"data_items": 20000, "num_samples": 1000, "repeats": 3, "teacher": ["--check-samples", "500"],
            "distill": []},
    "toy": {"data_items": 64, "num_samples": 20, "repeats": 1, "teacher": ["--max-items", "64"],
            "distill": ["--max-steps", "2", "--batch-size", "4", "--set", "train.convert_steps=1",
                        "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0",
                        "--set", "export.checkpoint=last",
                        "--set", "data.sigma_data_images=16", "--set", "guidance.embedding_dim=32"]},
}  # fmt: skip
# cpu: 20,000 of the 60,000 training images (evenly spaced, every class) - more than the 32,000 a 2,000-step run at
# batch 16 draws, and the image folder loads in seconds; 1,000 evaluation samples per sampler (the teacher check's
# fd_1000 is the same n: FD's small-sample bias makes only equal-n numbers comparable); the teacher's own check before
# distilling at 500 samples (class accuracy and a first FD; 2,000 by default took 9 of the sd row's 71.7 minutes), as
# the evaluation measures the teacher again at 1,000 next to the student
GRID_PER_CLASS = 4  # samples per class and sampler in the class grid
SHARED = ("total", "shared_vae")  # minutes not summed into a row's total: the shared VAE is trained once for all rows
MARKER = "family_benchmark.json"  # marks OUTPUT as a benchmark folder (shared VAE, data, reference, one per family)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, help=f"one of {', '.join(FAMILIES)}, or all")
    p.add_argument("--size", default="cpu", help=f"one of {', '.join(SIZES)}")
    p.add_argument("--output", type=Path, required=True,
                   help="benchmark folder: new, empty or made by this script (family F goes to OUTPUT/F)")
    p.add_argument("--teacher", type=Path, help="reuse this teacher folder (train_family_teacher.py output)")
    p.add_argument("--reuse-features", action="store_true",
                   help="keep OUTPUT/reference (test images and their cached features) if a run made it")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT/F when a run of F is there already")
    return p.parse_args(argv)


def fail(sentence: str) -> None:
    raise SystemExit(f"error: {sentence}")


def teacher_facts(folder: Path) -> dict:
    """teacher_info.json of a teacher folder written by train_family_teacher.py (refused otherwise)."""
    info = folder / "teacher_info.json"
    if not info.is_file():
        fail(f"--teacher '{folder}' is not a teacher folder written by examples/train_family_teacher.py (no "
             f"teacher_info.json).")  # fmt: skip
    return json.loads(info.read_text())


def validate(args: argparse.Namespace) -> list[str]:
    """One-sentence exits for bad input, before anything is written; returns the families to run."""
    if args.family != "all" and args.family not in FAMILIES:
        fail(f"unknown family {args.family!r}; known families: {', '.join(FAMILIES)} (or all).")
    if args.size not in SIZES:
        fail(f"unknown size {args.size!r}; known sizes: {', '.join(SIZES)}.")
    families = list(FAMILIES) if args.family == "all" else [args.family]
    out = args.output
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        fail(f"output '{out}' exists and is not a family-benchmark folder; name a new or empty folder.")
    for family in families:
        if (out / family).exists() and not args.overwrite:
            fail(f"'{out / family}' holds a {family} benchmark already; pass --overwrite to replace it.")
    if args.teacher is not None:
        if len(families) > 1:
            fail("--teacher names one teacher; use it with one --family, not all.")
        facts = teacher_facts(args.teacher)
        if (facts.get("family"), facts.get("size")) != (families[0], args.size):
            fail(f"--teacher '{args.teacher}' is a {facts.get('family')} teacher of size {facts.get('size')}, not "
                 f"the {families[0]} teacher of size {args.size} this benchmark distills.")  # fmt: skip
    fashion_split("test", max_items=10)  # MissingDataError (one sentence, exit 1) when Fashion-MNIST is absent
    return families


# --- data: the training images and the test images as image folders ----------------------------------------------


def write_image_folder(folder: Path, split: str, max_items: int | None, layout: str) -> Path:
    """The padded split as RGB PNGs: layout "captions" (metadata.jsonl 'text' = the class caption), "classes" (one
    subfolder per class, named so that their sorted order is the label order) or "plain" (reference images).
    Written into a temporary folder and renamed, so a stopped run never leaves a half folder."""
    if folder.is_dir():
        return folder
    from PIL import Image

    data = fashion_split(split, max_items)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = []
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        name = f"{label}_{CAPTIONS[label].split()[-1]}/{i:05d}.png" if layout == "classes" else f"{i:05d}.png"
        (tmp / name).parent.mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).convert("RGB").save(tmp / name)
        lines.append(json.dumps({"file_name": name, "text": CAPTIONS[label]}))
    if layout == "captions":
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(folder)
    return folder


def reference_folder(root: Path, size: dict, reuse: bool) -> Path:
    """OUTPUT/reference/images: the test split (toy: its first 100); kept with its cached features when reused."""
    folder = root / "reference" / "images"
    if not reuse:
        shutil.rmtree(root / "reference", ignore_errors=True)
    return write_image_folder(folder, "test", None if size["num_samples"] > 100 else 100, "plain")


# --- the stages: teacher, distill, evaluate, timing, grid -----------------------------------------------------------


def cli(*args: str) -> None:
    """`scm-distill ARGS` in a fresh process (as a user runs it); its output streams through."""
    command = [sys.executable, "-m", "scm_distill.cli", *args]
    print("+ scm-distill " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env)
    if done.returncode != 0:
        fail(f"`scm-distill {args[0]}` exited with status {done.returncode} (its message is above).")


def teacher_minutes(facts: dict) -> float:
    """Minutes a reused teacher took: its training and its checks (teacher_info.json)."""
    checks = [facts.get(key) or {} for key in ("check", "check_toolkit")]
    return round(facts.get("train_minutes", 0.0) + sum(c.get("check_minutes", 0.0) for c in checks), 2)


def teacher_folder(args: argparse.Namespace, family: str, root: Path, out: Path,
                   size: dict) -> tuple[Path, float, float | None]:  # fmt: skip
    """(teacher folder, its minutes, the shared VAE's minutes when this run trained it, else None): --teacher, or
    trained on the shared VAE (trained first if missing; its minutes are the VAE's, not this row's)."""
    if args.teacher is not None:
        return args.teacher, teacher_minutes(teacher_facts(args.teacher)), None
    kind = LATENT_FAMILIES[family].vae_kind
    vae, vae_minutes = root / f"vae-{kind}", None
    common = ["--size", args.size, *size["teacher"], *(["--check-samples", "0"] if args.size == "toy" else [])]
    if not (vae / "vae_info.json").is_file():
        started = time.time()
        train_teacher(["--family", f"vae-{kind}", "--output", str(vae), "--overwrite", *common])
        vae_minutes = round((time.time() - started) / 60, 2)
    started = time.time()
    train_teacher(["--family", family, "--output", str(out / "teacher"), "--vae", str(vae), "--overwrite", *common])
    return out / "teacher", (time.time() - started) / 60, vae_minutes


def distill(family: str, teacher: Path, data: Path, out: Path, size: dict) -> Path:
    recipe = REPO / "recipes" / f"{family}-fashion-cpu.yaml"
    cli("distill", "--recipe", str(recipe), "--teacher", str(teacher), "--data", str(data),
        "--output", str(out / "run"), "--set", f"data.latent_cache={out / 'latent-cache'}",
        *size["distill"])  # fmt: skip
    return out / "run" / "pipeline"


def evaluate(family: str, export: Path, teacher: Path, reference: Path, out: Path, size: dict) -> dict:
    """`scm-distill evaluate` of the student at 1 and 2 steps and the teacher at 2 and its default steps."""
    default = LATENT_FAMILIES[family].default_steps
    cached = reference.parent / ".fidelity-cache"
    evaluation = out / "evaluation"
    if cached.is_dir():  # the test images' features from an earlier run (--reuse-features)
        shutil.copytree(cached, evaluation / ".fidelity-cache", dirs_exist_ok=True)
    prompts = [] if family == "dit" else ["--prompts", str(write_captions(out))]
    cli("evaluate", "--model", str(export), "--teacher", str(teacher), "--reference", str(reference),
        "--steps", "1,2", "--teacher-steps", f"2,{default}", "--num-samples", str(size["num_samples"]),
        "--feature-extractor", "efficientnet-lite0", "--class-accuracy", "fashion-mnist", *prompts,
        "--trust-remote-code", "--output", str(evaluation))  # fmt: skip
    shutil.copytree(evaluation / ".fidelity-cache", cached, dirs_exist_ok=True)
    return json.loads((evaluation / "metrics.json").read_text())


def write_captions(out: Path) -> Path:
    path = out / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


def denoiser_of(pipe) -> torch.nn.Module:
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def timed_call(pipe, inputs: dict, repeats: int) -> dict:
    """Median batch-1 milliseconds of one pipeline call end to end, and of the part spent inside its denoiser."""
    return median_ms(lambda seed: pipe(**inputs, generator=torch.Generator().manual_seed(seed), output_type="np"),
                     denoiser_of(pipe), repeats)  # fmt: skip


def timing(family: str, export: Path, teacher: Path, guidance: float | None, repeats: int) -> dict:
    """Batch-1 latency: the teacher's stock call at its default steps (CFG at the evaluation's scale) against the
    export's own call at 2 and 1 steps."""
    import diffusers

    from scm_distill.export.call import PipelineSampler

    spec = LATENT_FAMILIES[family]()
    stock = diffusers.DiffusionPipeline.from_pretrained(teacher)
    stock.set_progress_bar_config(disable=True)
    scale = guidance if guidance is not None else spec.sizes["cpu"].guidance_scale
    result = {"teacher": {"steps": spec.default_steps, "guidance_scale": scale,
                          **timed_call(stock, {**spec.call_inputs([7], scale),
                                               "num_inference_steps": spec.default_steps}, repeats)}}  # fmt: skip
    sampler = PipelineSampler(export, prompts=None if family == "dit" else (CAPTIONS[7],), trust_remote_code=True)
    for steps in (2, 1):
        result[f"student_{steps}"] = {"steps": steps, **timed_call(
            sampler.pipe, {**sampler.inputs(1, 0, 0), **sampler.call_kwargs(steps)}, repeats)}  # fmt: skip
    for key in ("end_to_end_ms", "network_ms"):
        result[f"speedup_2_step_{key[:-3]}"] = result["teacher"][key] / result["student_2"][key]
    return result


def class_grid(family: str, export: Path, teacher: Path, guidance: float | None, path: Path) -> Path:
    """One row per class: GRID_PER_CLASS teacher samples (stock call, default steps) | as many student@2 samples."""
    import diffusers

    from scm_distill.export.call import PipelineSampler
    from scm_distill.families.base import images_to_uint8

    spec = LATENT_FAMILIES[family]()
    stock = diffusers.DiffusionPipeline.from_pretrained(teacher)
    stock.set_progress_bar_config(disable=True)
    scale = guidance if guidance is not None else spec.sizes["cpu"].guidance_scale
    sampler = PipelineSampler(export, prompts=None if family == "dit" else tuple(CAPTIONS), trust_remote_code=True)
    rows = {}
    for label, caption in enumerate(CAPTIONS):
        labels = [label] * GRID_PER_CLASS
        generator = torch.Generator().manual_seed(label)
        t = stock(**spec.call_inputs(labels, scale), num_inference_steps=spec.default_steps, generator=generator,
                  output_type="np").images  # fmt: skip
        inputs = {"class_labels": labels} if family == "dit" else {"prompt": [caption] * GRID_PER_CLASS}
        s = sampler.pipe(**inputs, **sampler.call_kwargs(2), generator=torch.Generator().manual_seed(label),
                         output_type="np").images  # fmt: skip
        rows[f"{caption}: teacher@{spec.default_steps} | student@2"] = torch.cat([images_to_uint8(t),
                                                                                images_to_uint8(s)])  # fmt: skip
    save_png(labelled_rows(rows, columns=2 * GRID_PER_CLASS), path)
    return path


PLAIN_DIFFUSERS = """
import json, sys
sys.modules["scm_distill"] = None  # this process cannot import scm_distill
import numpy as np
import torch
from diffusers import DiffusionPipeline
folder, call, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
np.save(out_file, pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images)
"""


def plain_diffusers(family: str, export: Path, out: Path) -> dict:
    """The export loaded with plain diffusers in a process that cannot import scm_distill, one sample per class at
    2 steps, against the same call through the toolkit's loader (what evaluate sampled)."""
    import numpy as np

    from scm_distill.export.call import PipelineSampler

    sampler = PipelineSampler(export, prompts=None if family == "dit" else tuple(CAPTIONS), trust_remote_code=True)
    inputs = {"class_labels": list(range(len(CAPTIONS)))} if family == "dit" else {"prompt": list(CAPTIONS)}
    call = {**inputs, **sampler.call_kwargs(2)}
    ours = sampler.pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    script, result = out / "plain_diffusers.py", out / "plain_diffusers.npy"
    script.write_text(PLAIN_DIFFUSERS)
    done = subprocess.run([sys.executable, str(script), str(export), json.dumps(call), str(result)], cwd=out,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return {"loaded": False, "error": done.stderr.strip().splitlines()[-1:]}
    diff = float(np.abs(np.load(result) - ours).max())
    return {"loaded": True, "samples": len(ours), "max_abs_diff": diff, "same": diff <= 1e-5}


# --- reports ------------------------------------------------------------------------------------------------------


def summary(family: str, size: str, report: dict) -> dict:
    """The committed file (examples/results/family-F-cpu.json): the keys issue 12 names, and the timing."""
    results = report.get("metrics", {}).get("results", {})
    default = f"teacher@{report['teacher']['default_steps']}"
    names = {"teacher_default": default, "teacher_2": "teacher@2", "student_1": "student@1", "student_2": "student@2"}
    return {"family": family, "size": size,
            "fd": {k: results[v]["fid"] for k, v in names.items() if v in results},
            "accuracy": {k: results[v]["accuracy"] for k, v in names.items() if "accuracy" in results.get(v, {})},
            "num_samples": report.get("metrics", {}).get("num_samples"),
            "num_reference": report.get("metrics", {}).get("num_reference"),
            "feature_extractor": report.get("metrics", {}).get("feature_extractor"),
            "teacher_guidance_scale": report.get("metrics", {}).get("teacher_guidance_scale"),
            "teacher": report.get("teacher"), "timing_batch1": report.get("timing"),
            "plain_diffusers": report.get("plain_diffusers"),
            "minutes": report["minutes"], "command": report["command"], "machine": report["machine"],
            "stages_done": report["stages_done"]}  # fmt: skip


def write_reports(out: Path, family: str, size: str, report: dict) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"family-{family}-{size}.json").write_text(json.dumps(summary(family, size, report), indent=2) + "\n")
    (out / "results.md").write_text(results_table(summary(family, size, report)))


def results_table(s: dict) -> str:
    def number(table: str, key: str, digits: int) -> str:
        value = s[table].get(key)
        return "" if value is None else f"{value:.{digits}f}"

    t = s.get("timing_batch1") or {}
    ms = {k: f"{t[k]['end_to_end_ms']:.0f} / {t[k]['network_ms']:.0f}" for k in ("teacher", "student_2",
                                                                                 "student_1") if k in t}  # fmt: skip
    rows = [("teacher, default steps", "teacher_default", "teacher"), ("teacher, 2 steps", "teacher_2", None),
            ("student, 2 steps", "student_2", "student_2"), ("student, 1 step", "student_1", "student_1")]
    lines = [f"| {label} | {number('fd', key, 2)} | {number('accuracy', key, 3)} | {ms.get(timed, '')} |"
             for label, key, timed in rows]  # fmt: skip
    return (f"# Family benchmark: {s['family']} ({s['size']})\n\nFD ({s['feature_extractor']}, {s['num_samples']} "
            f"samples vs {s['num_reference']} test images) and class accuracy (samples for every class equally; "
            f"teacher CFG {s['teacher_guidance_scale']}) on {s['machine']}; {s['minutes']['total']:.1f} min in all.\n\n"
            f"| sampler | FD | class accuracy | batch-1 ms, end to end / network |\n|---|---|---|---|\n"
            + "\n".join(lines) + f"\n\n`{s['command']}`\n\n![class grid](class_grid.png)\n")  # fmt: skip


def run_family(args: argparse.Namespace, family: str, root: Path, reference: Path, command: str) -> dict:
    size, out = SIZES[args.size], root / family
    report = {"family": family, "size": args.size, "command": command, "machine": machine(), "stages_done": [],
              "minutes": {}}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)  # validate() allowed it (--overwrite)
    out.mkdir(parents=True)

    def done(stage: str, minutes_from: float) -> float:
        if stage != "teacher":  # the teacher stage's minutes are its training time
            report["minutes"][stage] = round((time.time() - minutes_from) / 60, 2)
        report["stages_done"].append(stage)
        report["minutes"]["total"] = round(sum(v for k, v in report["minutes"].items() if k not in SHARED), 2)
        write_reports(out, family, args.size, report)
        return time.time()

    if family == "module":
        from module_benchmark import run_module

        run_module(args, root, size, report, done, train_teacher, teacher_minutes)
        print((out / "results.md").read_text())
        return report

    teacher, report["minutes"]["teacher"], vae_minutes = teacher_folder(args, family, root, out, size)
    if vae_minutes is not None:
        report["minutes"]["shared_vae"] = vae_minutes
    facts = teacher_facts(teacher)
    report["teacher"] = {"folder": str(teacher), "reused": args.teacher is not None,
                         **{k: facts.get(k) for k in ("pipeline", "denoiser", "parameters", "default_steps", "check",
                                                      "check_toolkit", "train_minutes")}}  # fmt: skip
    mark = done("teacher", time.time())
    layout = "classes" if family == "dit" else "captions"
    data = write_image_folder(root / f"train-{layout}-{size['data_items']}", "train", size["data_items"], layout)
    mark = done("data", mark)
    export = distill(family, teacher, data, out, size)
    mark = done("distill", mark)
    report["metrics"] = evaluate(family, export, teacher, reference, out, size)
    mark = done("evaluate", mark)
    guidance = report["metrics"].get("teacher_guidance_scale")
    report["timing"] = timing(family, export, teacher, guidance, size["repeats"])
    mark = done("timing", mark)
    class_grid(family, export, teacher, guidance, out / "class_grid.png")
    mark = done("grid", mark)
    report["plain_diffusers"] = plain_diffusers(family, export, out)
    done("plain_diffusers", mark)
    print((out / "results.md").read_text())
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        families = validate(args)
    except MissingDataError as error:
        raise SystemExit(str(error)) from None
    command = "python examples/family_benchmark.py " + " ".join(argv)
    root = args.output
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"size": args.size}) + "\n")
    reference = reference_folder(root, SIZES[args.size], args.reuse_features)
    for family in families:
        run_family(args, family, root, reference, command)


if __name__ == "__main__":
    main()
