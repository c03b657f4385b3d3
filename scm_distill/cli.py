"""The `scm-distill` command line: distill, sample, evaluate, bench, push, demo.

Every known bad input ends in one sentence on stderr and exit status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """Distill a diffusion pipeline into a two-step consistency model (sCM, arXiv 2410.11081).

  scm-distill distill --teacher PATH_OR_ID --data SPEC --output DIR    train and export a 2-step pipeline
  scm-distill sample  --model DIR                                       draw samples from an export
  scm-distill evaluate --model DIR --reference SPEC --output DIR        FID/KID/precision/recall vs steps
  scm-distill bench   --model DIR --output DIR                          sampling and training cost
  scm-distill push    DIR --repo-id NAME                                publish an export to the Hub
  scm-distill demo                                                      the whole path on built-in data"""


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher pipeline and export a two-step pipeline",
                       description="Continuous-time consistency distillation (sCD) of a teacher pipeline; "
                                   "the run ends with an exported diffusers pipeline in OUTPUT/pipeline.")  # fmt: skip
    p.add_argument("--teacher", help="teacher pipeline: a local folder or a Hugging Face Hub id")
    p.add_argument("--data", help="training images: a built-in name (digits, mnist5k, fashion-mnist), an "
                                  "imagefolder path, or hf:NAME[:CONFIG]")  # fmt: skip
    p.add_argument("--output", help="run directory (config, checkpoints, samples, pipeline/)")
    p.add_argument("--recipe", help="YAML file of config overrides (see recipes/)")
    p.add_argument("--max-steps", type=int, help="number of sCD optimizer steps")
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--seed", type=int, help="seed of every random choice of the run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-4 (repeatable)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const="latest", help="continue a run: 'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=run_distill)


def cli_overrides(args) -> dict:
    updates: dict = {}
    for key, value in (("teacher", args.teacher), ("output", args.output)):
        if value is not None:
            updates[key] = value
    if args.data is not None:
        updates["data"] = {"spec": args.data}
    train = {k: v for k, v in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                               ("seed", args.seed)) if v is not None}  # fmt: skip
    if train:
        updates["train"] = train
    return updates


def run_distill(args) -> int:
    from .config import resolve, to_dict

    config = resolve(args.recipe, cli_overrides(args), args.set)
    if args.dry_run:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    from .trainer import distill

    result = distill(config, resume=args.resume, overwrite=args.overwrite)
    print(f"exported: {result.export_dir}")
    return 0


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from an exported pipeline",
                       description="Load an exported pipeline with plain diffusers and save a PNG grid.")  # fmt: skip
    p.add_argument("--model", required=True, help="exported pipeline folder")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="network evaluations per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="samples.png", help="PNG file for the grid")
    p.set_defaults(run=run_sample)


def run_sample(args) -> int:
    import torch

    from .export.load import load_export
    from .grids import image_grid, save_png

    if args.num_images < 1 or args.steps < 1:
        raise ValueError("--num-images and --steps must be at least 1.")
    pipe = load_export(args.model)
    images = pipe(batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                  num_inference_steps=args.steps, output_type="pt").images  # fmt: skip
    grid = image_grid((images * 255).round().to(torch.uint8), columns=min(8, args.num_images))
    print(f"wrote {save_png(grid, Path(args.output))}")
    return 0


def add_push(sub) -> None:
    p = sub.add_parser("push", help="publish an exported pipeline to the Hugging Face Hub",
                       description="create_repo + upload_folder of an export (never checkpoints).")  # fmt: skip
    p.add_argument("folder", help="exported pipeline folder")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/my-2step-model")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.add_argument("--revision", help="branch to push to")
    p.set_defaults(run=run_push)


def run_push(args) -> int:
    from .export.push import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision)
    print(f"pushed: {url}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="distill the embedded digits teacher on the CPU and report",
                       description="Distill the built-in teacher (trained on scikit-learn digits), export, "
                                   "reload the export, sample with 1 and 2 steps, and report.")  # fmt: skip
    p.add_argument("--output", default="demo-output")
    p.add_argument("--max-steps", type=int, help="sCD steps (default: the demo recipe's)")
    p.add_argument("--num-samples", type=int, help="samples per Frechet distance (default 1000)")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from .demo import demo

    report = demo(Path(args.output), max_steps=args.max_steps, num_samples=args.num_samples)
    print(f"report: {report}")
    return 0


KNOWN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scm-distill", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_distill, add_sample, add_push, add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import NonFiniteError

    try:
        return args.run(args)
    except (*KNOWN_ERRORS, NonFiniteError) as error:
        print(f"scm-distill {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
