"""What the stock scheduler's grid costs: FD of an export's 2-step call against the TrigFlow 2-step sampler at the
times the run asked for (issue: exports sample on the times their stock scheduler holds).

    python examples/sampler_grid_cost.py --model demo-output/pipeline --reference digits --resize-to 16 \
        --num-samples 1000 --output examples/results/sampler-grid-cost-digits.json

Only UNet2D (pixel) exports are read back as a model here (the VP families share the LCM grid rule). Both samplers
use the same student weights and seeds; FD in EfficientNet-Lite0 features against the reference images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from scm_distill.data import load_images
from scm_distill.export.call import PipelineSampler
from scm_distill.export.contract import read_description
from scm_distill.families import load_teacher
from scm_distill.generate import consistency_samples
from scm_distill.grids import to_uint8
from scm_distill.metrics import EFFICIENTNET_LITE0, extract_features, feature_statistics, frechet_distance


def exact_trigflow(model, shape, t_max: float, t_mid: float, n: int, batch: int, seed: int) -> torch.Tensor:
    chunks = []
    for start in range(0, n, batch):
        generator = torch.Generator().manual_seed(seed + start)
        size = min(batch, n - start)
        chunks.append(to_uint8(consistency_samples(model, (size, *shape), 2, t_max, t_mid, generator)))
    return torch.cat(chunks)


def export_call(folder: Path, n: int, batch: int, seed: int) -> torch.Tensor:
    sampler = PipelineSampler(folder)
    return torch.cat([sampler(min(batch, n - s), 2, seed + s) for s in range(0, n, batch)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--reference", default="digits")
    p.add_argument("--split", default="train")
    p.add_argument("--resize-to", type=int)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    started = time.time()
    description = read_description(args.model)
    if description is None or description.family != "unet2d-vp" or description.requested_times is None:
        raise SystemExit(f"error: '{args.model}' is not a UNet2D export of this version (no requested times).")
    student = load_teacher(str(args.model)).model  # the export read back: v-prediction on the teacher's schedule
    reference = load_images(args.reference, split=args.split, resize_to=args.resize_to).uint8_images()
    ref_stats = feature_statistics(extract_features(reference, EFFICIENTNET_LITE0))
    t_max, t_mid = description.requested_times
    sets = {"exact TrigFlow times": exact_trigflow(student, reference.shape[1:], t_max, t_mid, args.num_samples, 250,
                                                   args.seed),
            "stock LCMScheduler grid (the export's call)": export_call(args.model, args.num_samples, 250, args.seed)}
    fd = {name: frechet_distance(*feature_statistics(extract_features(images, EFFICIENTNET_LITE0)), *ref_stats)
          for name, images in sets.items()}  # fmt: skip
    result = {"model": str(args.model), "reference": args.reference, "num_samples": args.num_samples,
              "requested_times": [t_max, t_mid], "grid_times": description.times["2"],
              "grid_timesteps": description.network_times["2"], "fd_2_steps": fd,
              "minutes": round((time.time() - started) / 60, 2),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "command": " ".join(["python examples/sampler_grid_cost.py", *(sys.argv[1:] if argv is None else argv)])}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
