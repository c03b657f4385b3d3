"""The `scm-distill` command line: distill, export, push, demo, plan here; sample, evaluate and bench in cli_read.py.

Every known bad input ends in one sentence on stderr and exit status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .cli_read import TRUST_HELP, add_bench, add_evaluate, add_sample
from .errors import Interrupted, UserError

DESCRIPTION = """Distill a diffusion pipeline into a two-step consistency model (sCM, arXiv 2410.11081).

  scm-distill distill --teacher PATH_OR_ID --data SPEC --output DIR    train and export a 2-step pipeline
  scm-distill export  RUN --checkpoint best --output DIR                 any checkpoint as a pipeline folder
  scm-distill sample  --model DIR                                       draw samples from an export
  scm-distill evaluate --model DIR --reference SPEC --output DIR        FID/KID/precision/recall vs steps
  scm-distill bench   --model DIR --output DIR                          sampling and training cost
  scm-distill push    DIR --repo-id NAME                                publish an export to the Hub
  scm-distill plan    --recipe FILE --num-processes N                   per-GPU memory under DDP and FSDP
  scm-distill demo                                                      the whole path on built-in data"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (flags: off; options without one: not set)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:
            return text if isinstance(action, argparse._HelpAction | argparse._VersionAction) else f"{text} " \
                "(default: off)"  # fmt: skip
        if action.default is None or action.default == []:
            return f"{text} (default: not set)"
        return f"{text} (default: %(default)s)"


def add_distill(sub, parents: list) -> None:
    p = sub.add_parser("distill", parents=parents,
                       help="distill a teacher pipeline and export a two-step pipeline",
                       description="Continuous-time consistency distillation (sCD) of a teacher pipeline; "
                                   "the run ends with an exported diffusers pipeline in OUTPUT/pipeline.")  # fmt: skip
    p.add_argument("--teacher", help="teacher pipeline: a local folder or a Hugging Face Hub id")
    p.add_argument("--data", help="training images: a built-in name (digits, mnist5k, fashion-mnist), an "
                                  "imagefolder path, or hf:NAME[:CONFIG] (default: the recipe's data.spec, else "
                                  "digits)")  # fmt: skip
    p.add_argument("--output", help="run directory (config, checkpoints, samples, pipeline/)")
    p.add_argument("--recipe", help="YAML file of config overrides (see recipes/)")
    p.add_argument("--max-steps", type=int, help="sCD optimizer steps, counted after the train.convert_steps "
                                                 "conversion steps (the run makes conversion + sCD steps; the "
                                                 "progress bar shows both; default: the recipe's "
                                                 "train.max_steps, else 2000)")  # fmt: skip
    p.add_argument("--batch-size", type=int,
                   help="batch size per process (default: the recipe's train.batch_size, else 64)")
    p.add_argument("--seed", type=int, help="seed of every random choice of the run (default: the recipe's "
                                            "train.seed, else 0)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-4 (repeatable)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue a run: 'latest' or a checkpoint folder; with only --output RUN, the run's own "
                        "config.json is the recipe (flags and --set still override it)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--report-to", choices=("none", "tensorboard", "wandb"),
                   help="tracker of the loss, gradient norm, learning rate, collapse monitor and sample grids, "
                        "through accelerate (files under OUTPUT/logs; default: the recipe's train.report_to, none)")
    p.add_argument("--export", choices=("last", "best"), dest="export_checkpoint",
                   help="weights the run's end exports: the last step's EMA, or the collapse monitor's best "
                        "checkpoint (default: the recipe's export.checkpoint, last)")  # fmt: skip
    p.add_argument("--push-to-hub", action="store_true",
                   help="publish the final export (never checkpoints) to the Hub when the run ends")  # fmt: skip
    p.add_argument("--hub-model-id", help="Hub repository of --push-to-hub, e.g. user/my-2step-model")
    p.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repository as private")
    p.add_argument("--license", help="licence of the published card when the teacher's card states none")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(run=run_distill)


def cli_overrides(args) -> dict:
    updates: dict = {}
    for key, value in (("teacher", args.teacher), ("output", args.output)):
        if value is not None:
            updates[key] = value
    if args.data is not None:
        updates["data"] = {"spec": args.data}
    train = {k: v for k, v in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                               ("seed", args.seed), ("report_to", getattr(args, "report_to", None)))
             if v is not None}  # fmt: skip
    if train:
        updates["train"] = train
    if getattr(args, "export_checkpoint", None):
        updates["export"] = {"checkpoint": args.export_checkpoint}
    return updates


def run_distill(args) -> int:
    from .config import resolve, to_dict
    from .parallel import launcher_settings

    config = launcher_settings(resolve(args.recipe, cli_overrides(args), args.set, base=run_base(args)), os.environ)
    if args.dry_run:
        check_teacher_exists(config.teacher)
        print(json.dumps(to_dict(config), indent=2))
        return 0
    if args.push_to_hub:
        check_push(args, config)
    from .trainer import distill

    result = distill(config, resume=args.resume, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"exported: {result.export_dir}")
    if args.push_to_hub and result.is_main:
        from .export.push import push_to_hub

        url = push_to_hub(result.export_dir, args.hub_model_id, private=args.hub_private, license=args.license)
        print(f"pushed: {url}")
    return 0


def check_teacher_exists(teacher: str) -> None:
    """--dry-run: a teacher that is a local path must exist (a Hub id is not looked up)."""
    from .errors import MissingFileError

    path = Path(teacher).expanduser()
    if not path.exists() and (teacher.startswith((".", "/", "~")) or teacher.count("/") != 1):
        raise MissingFileError(f"teacher '{teacher}' does not exist (not a local folder and not a Hub id "
                               f"'owner/name').")  # fmt: skip


def run_base(args):
    """`--resume` of a run folder without --recipe: the run's config.json is the starting point."""
    from .config import config_from_json

    saved = Path(args.output) / "config.json" if args.output else None
    if args.resume and not args.recipe and saved is not None and saved.is_file():
        return config_from_json(saved, check=False)
    return None


def check_push(args, config) -> None:
    """--push-to-hub's settings, checked before training: a repository id, and a licence for the card (the
    teacher's card's, else --license)."""
    from .export.push import check_repo_id

    if not args.hub_model_id:
        raise UserError("--push-to-hub needs --hub-model-id NAME (e.g. user/my-2step-model).")
    check_repo_id(args.hub_model_id, "--hub-model-id")
    if not args.license and not teacher_card_license(config.teacher):
        raise UserError(f"teacher '{config.teacher}' has no licence in its model card; pass --license (the teacher's "
                        f"own terms, e.g. --license apache-2.0) to publish the export.")  # fmt: skip


def teacher_card_license(teacher: str) -> str | None:
    from .export.card import folder_license
    from .families import resolve_folder

    return folder_license(resolve_folder(teacher))


def add_export(sub, parents: list) -> None:
    p = sub.add_parser("export", parents=parents, help="export any checkpoint of a run as a pipeline folder",
                       description="The same pipeline folder the run's end writes, from one of its checkpoints: the "
                                   "newest, the collapse monitor's best, or a step number.")  # fmt: skip
    p.add_argument("run_dir", metavar="RUN", help="run directory (the --output of distill)")
    p.add_argument("--checkpoint", default="latest", help="STEP, latest or best")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="weights", action="store_const", const="ema",
                         help="export the EMA weights (what runs export; the default)")  # fmt: skip
    weights.add_argument("--raw", dest="weights", action="store_const", const="raw",
                         help="export the raw trained weights instead of their EMA")  # fmt: skip
    p.add_argument("--output", required=True, help="folder to write the pipeline into (must not exist)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(run=run_export, weights="ema")


def run_export(args) -> int:
    from .run_export import export_checkpoint

    output = Path(args.output)
    if output.exists():
        raise UserError(f"--output '{output}' already exists; choose a new folder.")
    folder = export_checkpoint(Path(args.run_dir), output, args.checkpoint, args.weights, args.trust_remote_code)
    print(f"exported: {folder}")
    return 0


def add_plan(sub, parents: list) -> None:
    p = sub.add_parser("plan", parents=parents, help="per-GPU memory of a run under DDP and FSDP, before launching it",
                       description="Training state from the denoiser's parameter counts (built on the meta device) "
                                   "and activations counted on meta tensors at the run's resolution.")  # fmt: skip
    p.add_argument("--teacher", help="teacher: a recipe's Hub id or a local pipeline folder (default: the recipe's)")
    p.add_argument("--recipe", help="YAML file of config overrides (see recipes/)")
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field")
    p.add_argument("--num-processes", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="processes (GPUs) of the run (default: WORLD_SIZE or 1)")  # fmt: skip
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (default 80)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (default: data.resize_to)")
    p.set_defaults(run=run_plan, output=None, data=None, max_steps=None, seed=None)


def run_plan(args) -> int:
    from .config import resolve
    from .plan import format_plan, memory_plan

    if args.num_processes < 1 or args.gpu_memory_gb <= 0:
        raise UserError("--num-processes must be at least 1 and --gpu-memory-gb positive.")
    config = resolve(args.recipe, {**cli_overrides(args), "output": "plan"}, args.set)
    print(format_plan(memory_plan(config, args.num_processes, args.resolution), args.gpu_memory_gb))
    return 0


def add_push(sub, parents: list) -> None:
    p = sub.add_parser("push", parents=parents,
                       help="publish an exported pipeline to the Hugging Face Hub",
                       description="create_repo + one commit of an export (never checkpoints), its card filled with "
                                   "the repository id, licence and base model.")  # fmt: skip
    p.add_argument("folder", help="exported pipeline folder")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/my-2step-model")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--license", help="licence of the card when the teacher's own card states none (e.g. apache-2.0)")
    p.set_defaults(run=run_push)


def run_push(args) -> int:
    from .export.push import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                      license=args.license)  # fmt: skip
    print(f"pushed: {url}")
    return 0


def add_demo(sub, parents: list) -> None:
    p = sub.add_parser("demo", parents=parents,
                       help="distill the embedded digits teacher on the CPU and report",
                       description="Distill the built-in teacher (trained on scikit-learn digits), export, "
                                   "reload the export, sample with 1 and 2 steps, and report.")  # fmt: skip
    p.add_argument("--output", default="demo-output", help="folder of the demo's run, export and report")
    p.add_argument("--max-steps", type=int, help="sCD steps (default: the demo recipe's)")
    p.add_argument("--num-samples", type=int, help="samples per Frechet distance (default 1000)")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from .demo import demo

    report = demo(Path(args.output), max_steps=args.max_steps, num_samples=args.num_samples)
    print(f"report: {report}")
    return 0


EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 130  # 130 = 128 + SIGINT, what shells report for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the command name (SUPPRESS: the sub-parser does not reset the main one's value)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of any error (default: one sentence for your errors)")  # fmt: skip
    parser = argparse.ArgumentParser(prog="scm-distill", description=DESCRIPTION, parents=[debug],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"scm-distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # every option shows its default
    for add in (add_distill, add_export, add_sample, add_evaluate, add_bench, add_push, add_demo, add_plan):
        add(sub, parents=[debug])
    return parser


def one_line(error: BaseException) -> str:
    """The error's sentence on one line (a value quoted from the user's input may hold line breaks)."""
    return str(error).replace("\r", "\\r").replace("\n", "\\n")


def report_error(command: str, error: BaseException) -> int:
    """One line for the user's errors and Ctrl-C; the traceback for anything else (a bug in the toolkit)."""
    if isinstance(error, Interrupted | KeyboardInterrupt):
        message = one_line(error) if isinstance(error, Interrupted) else "interrupted."
        print(f"scm-distill {command}: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, UserError):
        print(f"scm-distill {command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    traceback.print_exception(error)
    print(f"scm-distill {command}: internal error ({type(error).__name__}): this is a bug in scm-distill; "
          f"please report it with the traceback above.", file=sys.stderr)  # fmt: skip
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Exception, KeyboardInterrupt) as error:
        if getattr(args, "debug", False):
            raise
        return report_error(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
