"""Class accuracy of generated Fashion-MNIST samples: the conditional yardstick next to the Fréchet distance.

A small CNN (`FashionClassifier`) trained by `examples/train_classifier.py` on the Fashion-MNIST train split; its
weights ship in `scm_distill/assets/fashion-classifier/` (safetensors) with a JSON stating how it was trained and
its test accuracy. It was trained on 28x28 items drawn at a random size between 24 and 32 pixels inside a black
32x32 frame (and sometimes blurred by a 16-pixel round trip), so it reads both layouts the teachers use: the item
padded to 32x32 (28 in 32) and the item resized to fill the frame (e.g. 16x16, upsampled to 32x32).

`class_accuracy(images, labels)` takes uint8 samples of any family [N, C, H, W] (C = 1 or 3: colour is averaged
to grey, as Fashion-MNIST's RGB copies are replicas of one channel) at any size (resized to 32x32, bilinear,
antialiased) and the class each sample was generated for; it returns the fraction classified as that class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

CLASSIFIER_DIR: Final = Path(__file__).resolve().parent.parent / "assets" / "fashion-classifier"
WEIGHTS_FILE: Final = "model.safetensors"
INFO_FILE: Final = "classifier.json"
INPUT_SIZE: Final = 32  # the classifier's input side, pixels (greyscale)
NUM_CLASSES: Final = 10  # Fashion-MNIST's classes, in its label order (scm_distill.data.builtin.FASHION_NAMES)
CLASSIFY_BATCH: Final = 500  # images per forward pass
YARDSTICKS: Final = ("fashion-mnist",)  # data sets with a shipped classifier (the --class-accuracy choices)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the shipped classifier (stored in its JSON, so the weights load into the same shape)."""

    widths: tuple[int, ...] = (32, 64, 128)  # channels of the three 3x3-conv stages, each followed by 2x2 max-pool
    dropout: float = 0.3  # before the final linear layer (training only)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class FashionClassifier(nn.Module):
    """Greyscale 32x32 in [-1, 1] -> 10 class logits: one conv block per stage (two in the middle stage), 2x2
    max-pool after each stage, global average pool, linear."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        w1, w2, w3 = config.widths
        self.features = nn.Sequential(conv_block(1, w1), nn.MaxPool2d(2),
                                      conv_block(w1, w2), conv_block(w2, w2), nn.MaxPool2d(2),
                                      conv_block(w2, w3), nn.MaxPool2d(2))  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(w3, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, 1, 32, 32] -> logits [B, 10]
        return self.head(self.features(x).mean(dim=(2, 3)))


def to_classifier_input(images: Tensor) -> Tensor:
    """uint8 [N, C, H, W], C in {1, 3}, any H, W -> float32 [N, 1, 32, 32] in [-1, 1] (grey = channel mean)."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        kind = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"class accuracy needs uint8 images [N, C, H, W] with 1 or 3 channels, got {kind}.")
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        grey = F.interpolate(grey, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                             align_corners=False)  # fmt: skip
    return grey / 127.5 - 1.0


def read_info(folder: Path = CLASSIFIER_DIR) -> dict:
    """The classifier's JSON: architecture, training, test accuracy."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the Fashion-MNIST classifier is missing ({path}); train it with "
                                f"examples/train_classifier.py.")  # fmt: skip
    return json.loads(path.read_text())


def load_classifier(folder: str | Path = CLASSIFIER_DIR) -> FashionClassifier:
    """The classifier of `folder` (default: the shipped asset) in eval mode; a strict load of its weights."""
    folder = Path(folder)
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in read_info(folder)["config"].items()})  # fmt: skip
    net = FashionClassifier(config)
    net.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def shipped_classifier() -> FashionClassifier:
    """The shipped classifier, loaded once per process."""
    return load_classifier(CLASSIFIER_DIR)


@torch.no_grad()
def predict(images: Tensor, classifier: nn.Module | None = None) -> Tensor:
    """Predicted class [N] (int64) of uint8 images [N, C, H, W]."""
    net = classifier if classifier is not None else shipped_classifier()
    x = to_classifier_input(images)
    return torch.cat([net(chunk).argmax(dim=1) for chunk in x.split(CLASSIFY_BATCH)])


def class_accuracy(images: Tensor, labels: Tensor | list[int], classifier: nn.Module | None = None) -> float:
    """Fraction of `images` (uint8 [N, C, H, W]) that the classifier assigns to `labels` [N] (their intended classes,
    0..9 in Fashion-MNIST's order)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"class accuracy needs one label per image, got {tuple(labels.shape)} labels for "
                         f"{images.shape[0]} images.")  # fmt: skip
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"class accuracy needs labels in 0..{NUM_CLASSES - 1} for at least one image.")
    return float((predict(images, classifier) == labels).double().mean())


def per_class_accuracy(images: Tensor, labels: Tensor | list[int], classifier: nn.Module | None = None) -> list:
    """Accuracy of each class 0..9 (None for a class with no images)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    hits = predict(images, classifier) == labels
    return [float(hits[labels == c].double().mean()) if (labels == c).any() else None for c in range(NUM_CLASSES)]
