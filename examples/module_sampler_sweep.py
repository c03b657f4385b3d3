"""FD and class accuracy of a module export's 2-step sampler over (sigma_max, t_mid), the sampling-time choice of
recipes/module-fashion-cpu.yaml (a consistency student samples at any t_max / t_mid without retraining).

    python examples/module_sampler_sweep.py --export RUN/pipeline --teacher TEACHER --output sweep.jsonl

Each line: sigma_max (in the network's own units; t_max as the recipe's sampling.sigma_max sets it, through
scm_distill.generate.sampling_times), t_mid, FD (EfficientNet-Lite0, n samples against the 10,000 test images) and
class accuracy, written as each point is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import module_benchmark as mb
from family_teachers import check

from scm_distill.config import SamplingConfig
from scm_distill.generate import sampling_times

GRID = ((10.0, 1.3), (10.0, 1.1), (10.0, 0.9), (20.0, 1.3), (5.0, 1.3), (5.0, 1.1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="a module export (the run's pipeline folder)")
    p.add_argument("--teacher", type=Path, required=True, help="its teacher folder (for the network class)")
    p.add_argument("--output", type=Path, required=True, help="JSON lines file to append to")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--cache", type=Path, default=Path("runs/reference/.fidelity-cache"))
    args = p.parse_args()
    sample, pipe = mb.student_sampler(args.export, args.teacher, 2)
    for sigma_max, t_mid in GRID:
        pipe.reading["times"] = list(sampling_times(SamplingConfig(sigma_max=sigma_max, t_mid=t_mid), pipe.model))
        result = check.check(sample, args.samples, mb.CHECK_BATCH, args.cache, None, {})
        line = {"sigma_max": sigma_max, "t_mid": t_mid, "times": pipe.reading["times"], "fd": result["fd"],
                "accuracy": result["accuracy"], "num_samples": args.samples}  # fmt: skip
        with args.output.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
