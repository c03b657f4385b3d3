"""Class accuracy of a text-to-image export's 2-step call against its guidance_scale: does the student follow its
guidance input? Loaded with plain diffusers (DiffusionPipeline.from_pretrained), the Fashion-MNIST captions of the
family benchmark, every class equally often, classified by the shipped classifier.

    python examples/guidance_sweep.py --export RUN/pipeline --scales 1,2,3.5,5,7 --output sweep.jsonl

Each line: guidance_scale, class accuracy, samples; written as each scale is measured. Seeds are the same for every
scale, so the scales differ only in guidance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from diffusers import DiffusionPipeline
from family_teachers.check import generate, pipeline_sampler
from family_teachers.data import CAPTIONS

from scm_distill.metrics.classifier import class_accuracy

BATCH = 50


def scales(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if any(not np.isfinite(v) or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"guidance scales must be finite and at least 1, got {text!r}")
    return values


def accuracy_at(pipe, guidance_scale: float, samples: int, size: int) -> float:
    """Class accuracy of the export's 2-step call at one guidance scale (the benchmark's balanced, seeded batches)."""
    call = lambda labels: {"prompt": [CAPTIONS[c] for c in labels], "guidance_scale": guidance_scale,  # noqa: E731
                           "height": size, "width": size}  # fmt: skip
    images, labels = generate(pipeline_sampler(pipe, call, 2), samples, BATCH)
    return class_accuracy(images, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="an exported text-to-image pipeline folder")
    p.add_argument("--scales", type=scales, default=[1.0, 2.0, 3.5, 5.0, 7.0], help="comma-separated guidance scales")
    p.add_argument("--samples", type=int, default=300, help="samples per scale (a multiple of 10: every class equally)")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--output", type=Path, required=True, help="JSON lines file to append to")
    args = p.parse_args()
    if not (args.export / "model_index.json").is_file():
        sys.exit(f"error: {args.export} is not a pipeline folder (no model_index.json).")
    if args.samples <= 0 or args.samples % len(CAPTIONS):
        sys.exit(f"error: --samples must be a positive multiple of {len(CAPTIONS)}, got {args.samples}.")
    pipe = DiffusionPipeline.from_pretrained(args.export, trust_remote_code=True)
    for s in args.scales:
        line = {"guidance_scale": s, "accuracy": accuracy_at(pipe, s, args.samples, args.size),
                "num_samples": args.samples, "steps": 2, "export": str(args.export)}  # fmt: skip
        with args.output.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
