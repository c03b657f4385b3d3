"""The teachers' data: Fashion-MNIST 28x28 padded to 32x32, its class captions, and the missing-data error.

Every family trains on the same images: the train split (60,000), zero-padded to 32x32 (black border, as
`load_images(..., pad_to=32)` does), replicated to RGB where a VAE encodes them. Text families caption image i
with CAPTIONS[label i]; DiT takes the label itself. FD references are the 10,000 test images in the same layout.
"""

from __future__ import annotations

import torch

from scm_distill.data import load_images
from scm_distill.data.builtin import FASHION_ENV, FASHION_HUB, fashion_dir

IMAGE_SIZE = 32  # pixels: 28 padded by 2 on every side
CAPTIONS = ("a photo of a t-shirt", "a photo of a trouser", "a photo of a pullover", "a photo of a dress",
            "a photo of a coat", "a photo of a sandal", "a photo of a shirt", "a photo of a sneaker",
            "a photo of a bag", "a photo of an ankle boot")  # Fashion-MNIST's classes 0..9, in label order


class MissingDataError(SystemExit):
    """Fashion-MNIST is neither installed nor reachable (exits with status 1 and one sentence)."""


def fashion_split(split: str, max_items: int | None = None):
    """The padded split as an in-memory ImageSet (uint8 images [N, 1, 32, 32], labels [N])."""
    try:
        return load_images("fashion-mnist", split=split, pad_to=IMAGE_SIZE, max_items=max_items)
    except (FileNotFoundError, ImportError, OSError) as error:
        raise MissingDataError(
            f"error: Fashion-MNIST is not installed in {fashion_dir()} (Debian package dataset-fashion-mnist: "
            f"`apt-get install dataset-fashion-mnist`, or set ${FASHION_ENV}) and the `datasets` fallback "
            f"({FASHION_HUB} on the Hugging Face Hub) failed ({type(error).__name__})."
        ) from None


def to_model_range(images: torch.Tensor, channels: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> float32 [N, channels, H, W] in [low, high] (grey replicated to RGB when channels = 3)."""
    x = images.float() / 255.0 * (high - low) + low
    return x.expand(-1, channels, -1, -1).contiguous() if channels != x.shape[1] else x


def balanced_labels(n: int, classes: int = len(CAPTIONS)) -> torch.Tensor:
    """n labels with every class equally often (0, 1, ..., 9, 0, 1, ...): samples generated for each class equally."""
    return torch.arange(n) % classes
