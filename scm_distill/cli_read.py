"""The commands that read what a run made: `sample`, `evaluate` and `bench` (an export folder, or a run directory
and one of its checkpoints), and the inputs they share.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from .errors import UserError

TRUST_HELP = ("run Python code shipped in a pipeline folder (an export's own pipeline file, custom components); "
              "only for folders you trust")


def add_reading_options(p) -> None:
    """The options of every command that loads an export: a module export's network, and trust in shipped code."""
    p.add_argument("--network", metavar="FILE.py:NAME",
                   help="module exports: the class (or function) of FILE.py that makes your network, called "
                        "without arguments (needs --trust-remote-code)")  # fmt: skip
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def add_sample(sub, parents: list) -> None:
    p = sub.add_parser("sample", parents=parents,
                       help="draw samples from an exported pipeline",
                       description="Load an exported pipeline with plain diffusers and save a PNG grid.")  # fmt: skip
    p.add_argument("--model", required=True, help="exported pipeline folder, or a run directory (see --checkpoint)")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--num-images", type=int, default=16, help="images in the grid")
    p.add_argument("--steps", type=int, default=2, help="network evaluations per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (image k is the same at any --num-images)")
    p.add_argument("--prompt", action="append", help="prompt of a text-to-image export (repeatable; cycled)")
    p.add_argument("--prompts", help="text file of prompts, one per line (text-to-image exports)")
    p.add_argument("--output", default="samples.png", help="image file of the grid; its suffix (.png, .jpg, .jpeg, "
                                                           ".webp) picks the format")
    add_reading_options(p)
    p.set_defaults(run=run_sample)


def run_sample(args) -> int:
    from .export.call import PipelineSampler
    from .grids import image_grid, save_image

    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1.")
    output = Path(args.output)
    check_png_output(output)
    with model_folder(args) as model:
        sampler = PipelineSampler(model, prompts_from(args), trust_remote_code=args.trust_remote_code,
                                  network=args.network)  # fmt: skip
        images = sampler(args.num_images, args.steps, args.seed)
    grid = image_grid(images, columns=min(8, args.num_images))
    print(f"wrote {save_image(grid, output)}")
    return 0


CHECKPOINT_HELP = ("with --model RUN: the run's checkpoint to use, STEP, latest or best (default: the run's "
                   "pipeline/ export, else latest)")


@contextlib.contextmanager
def model_folder(args):
    """--model as a pipeline folder: an export as given; a run directory: its pipeline/ export, or the pipeline of
    --checkpoint exported into a temporary folder (the same folder `scm-distill export` writes)."""
    from .run_dir import is_run_dir

    model = Path(args.model)
    if not is_run_dir(model):
        if args.checkpoint:
            raise UserError(f"--checkpoint needs --model to be a run directory; '{model}' is not one.")
        yield model
        return
    if not args.checkpoint and (model / "pipeline" / "model_index.json").is_file():
        yield model / "pipeline"
        return
    from .run_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="scm-distill-checkpoint-") as tmp:
        yield export_checkpoint(model, Path(tmp) / "pipeline", args.checkpoint or "latest",
                                trust_remote_code=args.trust_remote_code)  # fmt: skip


def check_png_output(path: Path) -> None:
    """`sample --output` names a new or existing .png / .jpg / .jpeg / .webp file whose folder can be written."""
    from .files import check_writable_file
    from .grids import IMAGE_FORMATS

    check_writable_file(path, "--output")
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise UserError(f"--output '{path}' must name a .png, .jpg, .jpeg or .webp file.")


def prompts_from(args) -> tuple[str, ...] | None:
    """--prompt TEXT (repeatable) and/or --prompts FILE, in that order; None when neither is given."""
    from .export.call import read_prompts

    prompts = tuple(getattr(args, "prompt", None) or ()) + (read_prompts(args.prompts) if args.prompts else ())
    return prompts or None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def add_evaluate(sub, parents: list) -> None:
    p = sub.add_parser("evaluate", parents=parents,
                       help="FID/KID/precision/recall of an export (and its teacher) vs steps",
                       description="Quality against network evaluations through torch-fidelity; writes "
                                   "metrics.json, report.md, curve.png and sample grids to OUTPUT.")  # fmt: skip
    p.add_argument("--model", required=True, help="exported pipeline folder, or a run directory (see --checkpoint)")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--reference", required=True, help="reference images: data spec (built-in, folder, hf:NAME)")
    p.add_argument("--teacher", help="teacher pipeline, evaluated with its own sampler at --teacher-steps")
    p.add_argument("--steps", type=int_list, default=(1, 2, 4), help="student step counts (default 1,2,4)")
    p.add_argument("--teacher-steps", type=int_list, default=(2, 4, 10, 25, 50, 100),
                   help="step counts of the teacher's own sampler, comma-separated")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=1000, help="samples per sampler and step count")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    p.add_argument("--feature-extractor", default="auto",
                   help="auto (Inception-v3 when its weights are available offline, else EfficientNet-Lite0), "
                        "inception-v3-compat or efficientnet-lite0")  # fmt: skip
    p.add_argument("--inception-weights", help="path to torch-fidelity's Inception-v3 weights")
    p.add_argument("--resize-reference", action="store_true",
                   help="resize reference images to the model's resolution (bilinear, antialiased)")  # fmt: skip
    p.add_argument("--reference-split", default="train", help="split of the reference data")
    p.add_argument("--prompts", help="text-to-image exports: text file of prompts, one per line, used in order "
                                     "(cycled) for the student and the teacher")  # fmt: skip
    p.add_argument("--teacher-guidance-scale", type=float,
                   help="CFG scale of a guided teacher (default: the scale the export's 2-step call uses; pass it "
                        "for LoRA students with CFG merged into their weights)")  # fmt: skip
    p.add_argument("--class-accuracy", choices=["fashion-mnist"],
                   help="also classify the samples with the shipped Fashion-MNIST classifier: class-conditional "
                        "exports get labels 0..9 in order, text exports need --prompts with the 10 class captions "
                        "in class order; metrics.json records each sampler's accuracy")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for metrics.json, report.md, curve.png and grids")
    add_reading_options(p)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from .evaluation.evaluate import EvalSettings, evaluate

    settings = EvalSettings(steps=args.steps, teacher_steps=args.teacher_steps, num_samples=args.num_samples,
                            seed=args.seed, feature_extractor=args.feature_extractor,
                            inception_weights=args.inception_weights, resize_reference=args.resize_reference,
                            reference_split=args.reference_split, prompts=prompts_from(args),
                            teacher_guidance_scale=args.teacher_guidance_scale,
                            trust_remote_code=args.trust_remote_code, class_accuracy=args.class_accuracy,
                            network=args.network)  # fmt: skip
    with model_folder(args) as model:
        metrics = evaluate(model, args.reference, Path(args.output), args.teacher, settings)
    for name, result in metrics["results"].items():
        accuracy = f", class accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
        print(f"{name}: FID {result['fid']:.3f} ({metrics['feature_extractor']}){accuracy}")
    return 0


def add_bench(sub, parents: list) -> None:
    p = sub.add_parser("bench", parents=parents,
                       help="sampling speed and training cost, teacher vs student, in one run",
                       description="Latency/throughput of the teacher's sampler vs the student's 1/2 steps, the "
                                   "sCD step vs a diffusion step (parts, memory), and their scaling.")  # fmt: skip
    p.add_argument("--model", required=True, help="exported pipeline folder")
    p.add_argument("--teacher", help="teacher pipeline folder (for the sampling comparison)")
    p.add_argument("--teacher-steps", type=int, default=100, help="steps of the teacher's sampler")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is reported)")
    p.add_argument("--no-scaling", action="store_true", help="skip the resolution/width scaling table")
    p.add_argument("--output", required=True, help="folder for bench.json, report.md and the plots")
    add_reading_options(p)
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    from .evaluation.bench import BenchSettings, bench

    settings = BenchSettings(teacher_steps=args.teacher_steps, repeats=args.repeats, scaling=not args.no_scaling,
                             trust_remote_code=args.trust_remote_code, network=args.network)  # fmt: skip
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1.")
    if args.repeats == 1:
        print("warning: --repeats 1 times everything once, so the ratios below have no spread; use --repeats 3 or "
              "more to compare them.", file=sys.stderr)  # fmt: skip
    results = bench(Path(args.model), Path(args.output), args.teacher, settings)
    for record in results["training"]:
        print(f"training ({record['precision']}): sCD/diffusion {record['scd_over_diffusion']}x, "
              f"JVP/forward {record['jvp_over_forward']}x{spread_text(record['timings'].values())}")  # fmt: skip
    for key, what in (("network_batch1", "networks"), ("end_to_end_batch1", "pipelines end to end")):
        if key in results["sampling"]:
            print(f"sampling at batch 1 ({what}): 2-step speedup {results['sampling'][key]['speedup_2_step']:.1f}x")
    if "note" in results:
        print(results["note"])
    return 0


def spread_text(timings) -> str:
    """' (timings spread up to X% of their median over N repeats)' of a bench table's timings."""
    timings = [t for t in timings if t.get("max_ms") is not None and t.get("median_ms")]
    if not timings:
        return ""
    spread = max((t["max_ms"] - t["min_ms"]) / t["median_ms"] for t in timings)
    return f" (max-min spread up to {100 * spread:.0f}% of the median over {timings[0]['repeats']} repeats)"
