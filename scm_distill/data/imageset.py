"""The ImageSet interface every data source returns, its in-memory form, batching and compatibility checks.

An item is {"image": float32 [C, H, W] in [-1, 1], "label": int64 scalar (labelled sets only),
"caption": str (captioned sets only)}. Images are kept as uint8 until an item is read (see transforms.py).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .transforms import to_signed_unit


# A deterministic subset of range(num_items): all of it in order when n is None or >= num_items, else n
# indices drawn by a permutation seeded with `seed`, returned in increasing order.
def subset_indices(num_items: int, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n >= num_items:
        return torch.arange(num_items)
    if n < 0:
        raise UserError(f"n must be non-negative or None, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_items, generator=generator)[:n].sort().values


# max_items rule: an evenly strided subset (first item included, order kept), so that class-sorted folders
# keep every class; all items when max_items is None or >= num_items.
def evenly_spaced(num_items: int, max_items: int | None) -> torch.Tensor:
    if max_items is None or max_items >= num_items:
        return torch.arange(num_items)
    return torch.arange(max_items) * num_items // max_items


class ImageSet(Dataset):
    """A data set of images in [-1, 1] with optional integer labels and captions.

    Attributes: name (the spec it was loaded from, for reports), split, channels (1 or 3),
    resolution ((H, W) after transforms), class_names (tuple or None), num_classes (or None), has_captions.
    Subclasses implement __len__, uint8_image, and label / caption when they have them.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        channels: int,
        resolution: tuple[int, int],
        class_names: tuple[str, ...] | None = None,
        has_captions: bool = False,
    ) -> None:
        self.name = name
        self.split = split
        self.channels = channels
        self.resolution = resolution
        self.class_names = class_names
        self.has_captions = has_captions

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def uint8_image(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 [C, H, W] after transforms."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise TypeError(f"data '{self.name}' has no labels")

    def caption(self, index: int) -> str:
        raise TypeError(f"data '{self.name}' has no captions")

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for data '{self.name}' of {len(self)} images")
        index = index % len(self)
        item: dict = {"image": to_signed_unit(self.uint8_image(index))}
        if self.class_names is not None:
            item["label"] = torch.tensor(self.label(index), dtype=torch.int64)
        if self.has_captions:
            item["caption"] = self.caption(index)
        return item

    def uint8_images(self, n: int | None = None, seed: int = 0) -> torch.Tensor:
        """uint8 [N, C, H, W] for FID reference sets: all images, or a seeded subset of n (same n and seed,
        same images)."""
        indices = subset_indices(len(self), n, seed)
        if len(indices) == 0:
            return torch.empty((0, self.channels, *self.resolution), dtype=torch.uint8)
        return torch.stack([self.uint8_image(int(i)) for i in indices])

    def __repr__(self) -> str:
        h, w = self.resolution
        classes = "" if self.class_names is None else f", {self.num_classes} classes"
        captions = ", captions" if self.has_captions else ""
        return (
            f"{type(self).__name__}({self.name!r}, split={self.split!r}, {len(self)} images, "
            f"{self.channels}x{h}x{w}{classes}{captions})"
        )


class TensorImageSet(ImageSet):
    """An ImageSet held in memory as one uint8 tensor (transforms already applied)."""

    def __init__(
        self,
        images: torch.Tensor,
        *,
        name: str,
        split: str,
        labels: torch.Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        # images: [N, C, H, W] uint8, labels: [N] int64
        if images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(images.shape)
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {shape}")
        if (labels is None) != (class_names is None):
            raise ValueError("labels and class_names must be given together")
        super().__init__(
            name=name,
            split=split,
            channels=images.shape[1],
            resolution=(images.shape[2], images.shape[3]),
            class_names=class_names,
        )
        self.images = images
        self.labels = None if labels is None else labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def uint8_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def label(self, index: int) -> int:
        if self.labels is None:
            return super().label(index)
        return int(self.labels[index])

    def uint8_images(self, n: int | None = None, seed: int = 0) -> torch.Tensor:
        return self.images[subset_indices(len(self), n, seed)].clone()


# Stack a list of items into a batch: image [B, C, H, W], label [B] (if present), caption list (if present).
def collate(items: list[dict]) -> dict:
    if not items:
        raise ValueError("cannot collate an empty list of items")
    batch: dict = {"image": torch.stack([item["image"] for item in items])}
    if "label" in items[0]:
        batch["label"] = torch.stack([item["label"] for item in items])
    if "caption" in items[0]:
        batch["caption"] = [item["caption"] for item in items]
    return batch


def _describe(channels: int, resolution: tuple[int, int]) -> str:
    plural = "" if channels == 1 else "s"
    return f"{channels} channel{plural} at {resolution[0]}x{resolution[1]}"


# Raise a one-sentence ValueError when the data's channels or resolution differ from what a model expects.
def check_compatible(
    images: ImageSet, channels: int, resolution: int | tuple[int, int], what: str = "teacher"
) -> None:
    expected = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if images.channels == channels and tuple(images.resolution) == expected:
        return
    hints = []
    if images.channels != channels:
        hints.append(f"use data with {channels} channel{'' if channels == 1 else 's'}")
    if tuple(images.resolution) != expected:
        hints.append("set data.resize_to or data.pad_to")
    hint = " and ".join(hints)
    raise UserError(
        f"data '{images.name}' has {_describe(images.channels, images.resolution)} "
        f"but the {what} expects {_describe(channels, expected)}; {hint}"
    )
