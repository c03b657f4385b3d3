"""Train a small teacher of one model family on Fashion-MNIST, with the family's own diffusers classes and native
objective, save it as an ordinary pipeline folder, and check that it samples well (FD and class accuracy).

    python examples/train_family_teacher.py --family vae-kl --output /work/runs/teachers/vae-kl
    python examples/train_family_teacher.py --family sd --size cpu --output /work/runs/teachers/sd \
        --vae /work/runs/teachers/vae-kl
    python examples/train_family_teacher.py --check-only /work/runs/teachers/sd --guidance-scale 2

Families: sd (SD 1.x layout), sdxl, dit, sd3, flux, sana, edm (latent, on a shared VAE), module (a plain nn.Module
of our own on pixels, saved as safetensors + JSON + its source), vae-kl / vae-kl4 / vae-dc (the shared
autoencoders: the 8-channel AutoencoderKL for sd, sdxl, dit, sd3 and flux, the 4-channel one for edm, AutoencoderDC
for Sana). A latent family without --vae uses (and, when missing, first trains) OUTPUT/../vae-KIND. The modules in
examples/family_teachers/ say what each family trains and how; every number of a run goes to
OUTPUT/teacher_info.json (vae_info.json for a VAE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from family_teachers import latent_teacher  # noqa: E402
from family_teachers.module_family import check_module, train_module  # noqa: E402
from family_teachers.vae import VAE_SIZES, check_vae, train_vae  # noqa: E402

LATENT_FAMILIES = latent_teacher.LATENT_FAMILIES
VAE_FAMILIES = {"vae-kl": "kl", "vae-kl4": "kl4", "vae-dc": "dc"}
FAMILIES = (*LATENT_FAMILIES, "module", *VAE_FAMILIES)
SIZES = ("cpu", "toy")  # cpu: the real teachers (<= ~25 min each on 2 cores); toy: seconds, for tests
DEFAULT_CHECK = {"cpu": 2000, "toy": 0}  # samples of the teacher check per size (0: no check; 2,000 as the pixel
# benchmark's FD, whose small-sample bias is large: real training images score 9.7 at 1,000 and 5.0 at 2,000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", help=f"one of {', '.join(FAMILIES)}")
    p.add_argument("--size", default="cpu", help=f"one of {', '.join(SIZES)}")
    p.add_argument("--output", type=Path, help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--vae", type=Path, help="VAE folder (vae-kl / vae-dc output) for a latent family")
    p.add_argument("--steps", type=int, help="training steps (default: the size's; a vae-* family's are the VAE's)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the size's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the size's)")
    p.add_argument("--max-items", type=int, help="train on an evenly spaced subset of the train split")
    p.add_argument("--check-samples", type=int, help="samples of the FD / accuracy check (default 2000; toy 0)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale of the check (default: the family's)")
    p.add_argument("--check-only", type=Path, metavar="FOLDER", help="only (re)check a trained teacher folder")
    p.add_argument("--toolkit-samples", type=int, default=0,
                   help="latent families: also check the teacher with this many samples as "
                        "scm_distill.families.load_teacher reads it (the toolkit's DDIM sampler at the same steps and "
                        "guidance, what evaluate and distill see); with --check-only and --check-samples 0 only "
                        "this check runs")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """One-sentence exits for bad arguments, before anything is read or written."""
    if args.check_only is not None:
        if not (args.check_only / "teacher_info.json").is_file() and not (args.check_only / "vae_info.json").is_file():
            raise SystemExit(f"error: '{args.check_only}' is not a teacher or VAE folder written by this script.")
        return
    if args.family not in FAMILIES:
        raise SystemExit(f"error: unknown family {args.family!r}; known families: {', '.join(FAMILIES)}.")
    if args.size not in SIZES:
        raise SystemExit(f"error: unknown size {args.size!r}; known sizes: {', '.join(SIZES)}.")
    if args.output is None:
        raise SystemExit("error: --output is required.")
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"error: output '{args.output}' exists; pass --overwrite to replace it.")
    for name in ("steps", "batch_size", "max_items", "check_samples", "toolkit_samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name.endswith("samples") else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("check_samples", "toolkit_samples"):
        value = getattr(args, name)
        if value and value < 10:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be 0 or at least 10 (one per class), got "
                             f"{value}.")  # fmt: skip


def train_overrides(args: argparse.Namespace) -> dict:
    names = {"steps": "steps", "batch_size": "batch_size", "lr": "lr"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def vae_folder(args: argparse.Namespace, kind: str, command: str) -> Path:
    """--vae, else OUTPUT/../vae-KIND, trained first when it is not there yet."""
    if args.vae is not None:
        if not args.vae.is_dir():
            raise SystemExit(f"error: --vae '{args.vae}' does not exist; train one with --family vae-{kind}.")
        return args.vae
    folder = args.output.resolve().parent / f"vae-{kind}"
    if not folder.is_dir():
        print(f"no VAE at {folder}: training it first")
        train_vae(kind, args.size if args.size in VAE_SIZES else "cpu", folder, args.seed, args.max_items, False,
                  command)  # fmt: skip
        if check_samples(args):
            check_vae(folder, check_samples(args), cache_dir(folder))
    return folder


def check_samples(args: argparse.Namespace) -> int:
    return args.check_samples if args.check_samples is not None else DEFAULT_CHECK[args.size]


def cache_dir(folder: Path) -> Path:
    """The FD reference-feature cache, shared by the teachers of one parent folder."""
    return Path(folder).resolve().parent / ".fidelity-cache"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    validate(args)
    command = "python examples/train_family_teacher.py " + " ".join(argv)
    if args.check_only is not None:
        folder = args.check_only
        n = DEFAULT_CHECK["cpu"] if args.check_samples is None else args.check_samples
        if (folder / "vae_info.json").is_file():
            check_vae(folder, n or DEFAULT_CHECK["cpu"], cache_dir(folder))
        elif (folder / "module.json").is_file():
            check_module(folder, n or DEFAULT_CHECK["cpu"], args.guidance_scale, cache_dir(folder))
        else:
            if n:
                latent_teacher.check_teacher(folder, n, args.guidance_scale, cache_dir(folder))
            if args.toolkit_samples:
                latent_teacher.check_toolkit_reading(folder, args.toolkit_samples, args.guidance_scale,
                                                     cache_dir(folder))  # fmt: skip
        return
    n = check_samples(args)
    if args.family in VAE_FAMILIES:
        train_vae(VAE_FAMILIES[args.family], args.size, args.output, args.seed, args.max_items, args.overwrite,
                  command, train_overrides(args))  # fmt: skip
        if n:
            check_vae(args.output, n, cache_dir(args.output))
    elif args.family == "module":
        train_module(args.size, args.output, args.seed, train_overrides(args), args.max_items, command, args.overwrite)
        if n:
            check_module(args.output, n, args.guidance_scale, cache_dir(args.output))
    else:
        kind = LATENT_FAMILIES[args.family].vae_kind
        vae = vae_folder(args, kind, command.replace(f"--family {args.family}", f"--family vae-{kind}"))
        latent_teacher.train_latent_teacher(args.family, args.size, args.output, vae, args.seed,
                                            train_overrides(args), command, args.overwrite)  # fmt: skip
        if n:
            latent_teacher.check_teacher(args.output, n, args.guidance_scale, cache_dir(args.output))
        if args.toolkit_samples:
            latent_teacher.check_toolkit_reading(args.output, args.toolkit_samples, args.guidance_scale,
                                                 cache_dir(args.output))  # fmt: skip


if __name__ == "__main__":
    main()
