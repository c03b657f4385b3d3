"""Data handed to `distill(config, data=...)` in Python: image tensors, or any torch `Dataset`.

- a tensor [N, C, H, W]: uint8 0..255, or floating point in [-1, 1] (the toolkit's image range, as every data source
  gives it; the teacher maps it onto its own, e.g. `ModuleTeacher(data_range=(-0.5, 0.5))`);
- a pair (images, labels): such a tensor and integer labels [N] (classes 0..max label);
- a `torch.utils.data.Dataset` whose items are such an image [C, H, W], an (image, label) pair, or a dict with
  "image" (and "label", "caption"); labels are kept when the data set names its classes (a `classes` attribute,
  as torchvision's have).
The images are used as given: config.data's spec, resize, pad and max_items do not apply.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from .imageset import ImageSet

RANGE_SLACK = 1e-3  # float images may exceed [-1, 1] by rounding


def float_image(image, what: str, ndim: int = 3) -> Tensor:
    """Images as float32 in [-1, 1] (one [C, H, W], or [N, C, H, W] with ndim 4): uint8 mapped from 0..255, floats
    checked against the range."""
    image = torch.as_tensor(image)
    if image.ndim != ndim:
        shape = "[C, H, W]" if ndim == 3 else "[N, C, H, W]"
        raise UserError(f"{what} must be {shape}, got shape {tuple(image.shape)}.")
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    if not image.is_floating_point():
        raise UserError(f"{what} must be uint8 (0..255) or floating point in [-1, 1], got {image.dtype}.")
    low, high = float(image.min()), float(image.max())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise UserError(f"{what} lies in [{low:.3g}, {high:.3g}], outside [-1, 1]: give images in [-1, 1] (or uint8) "
                        f"and state your network's own range as ModuleTeacher(data_range=...).")  # fmt: skip
    return image.float().clamp(-1, 1)


def to_uint8(image: Tensor) -> Tensor:
    """float [C, H, W] in [-1, 1] -> uint8 (FID references, latent statistics)."""
    return ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class FloatImageSet(ImageSet):
    """Images held in memory as given (float32 [N, C, H, W] in [-1, 1]), optional labels."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, name: str = "tensors"):
        images = float_image(images, "the image tensor", ndim=4)
        if len(images) == 0:
            raise UserError("the image tensor holds no images.")
        classes = None
        if labels is not None:
            labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
            if len(labels) != len(images) or int(labels.min()) < 0:
                raise UserError(f"labels must be one non-negative integer per image, got {len(labels)} for "
                                f"{len(images)} images.")  # fmt: skip
            classes = tuple(str(c) for c in range(int(labels.max()) + 1))
        super().__init__(name=name, split="train", channels=images.shape[1],
                         resolution=(images.shape[2], images.shape[3]), class_names=classes)  # fmt: skip
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def uint8_image(self, index: int) -> Tensor:
        return to_uint8(self.images[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __getitem__(self, index: int) -> dict:
        item = {"image": self.images[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


def dataset_item(raw) -> dict:
    """A user data set's item as {"image", and "label" / "caption" when it has them}."""
    if isinstance(raw, dict):
        if "image" not in raw:
            raise UserError(f"a data set item that is a dict needs an 'image' entry, got keys {sorted(raw)}.")
        return raw
    if isinstance(raw, (tuple, list)):
        return {"image": raw[0], "label": raw[1]} if len(raw) > 1 else {"image": raw[0]}
    return {"image": raw}


class DatasetImageSet(ImageSet):
    """A torch Dataset read lazily, item by item, as the toolkit's items."""

    def __init__(self, dataset: Dataset, name: str | None = None):
        if len(dataset) == 0:
            raise UserError("the data set is empty.")
        self.dataset = dataset
        first = dataset_item(dataset[0])
        image = float_image(first["image"], "item 0's image")
        classes = getattr(dataset, "classes", None)
        self.has_labels = "label" in first and classes is not None
        super().__init__(name=name or type(dataset).__name__, split="train", channels=image.shape[0],
                         resolution=tuple(image.shape[1:]), class_names=tuple(classes) if self.has_labels else None,
                         has_captions="caption" in first)  # fmt: skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        raw = dataset_item(self.dataset[index])
        item = {"image": float_image(raw["image"], f"item {index}'s image")}
        if tuple(item["image"].shape) != (self.channels, *self.resolution):
            raise UserError(f"item {index}'s image has shape {tuple(item['image'].shape)}, item 0's "
                            f"{(self.channels, *self.resolution)}; every image must have one shape.")  # fmt: skip
        if self.has_labels:
            item["label"] = torch.as_tensor(raw["label"], dtype=torch.int64)
        if self.has_captions:
            item["caption"] = str(raw["caption"])
        return item

    def uint8_image(self, index: int) -> Tensor:
        return to_uint8(self[index]["image"])

    def label(self, index: int) -> int:
        return int(self[index]["label"])

    def caption(self, index: int) -> str:
        return self[index]["caption"]


def as_image_set(data) -> ImageSet:
    """`distill(data=...)`: an ImageSet as is; tensors, (images, labels) or a Dataset wrapped (module docstring)."""
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, Tensor):
        return FloatImageSet(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return FloatImageSet(data[0], data[1])
    if isinstance(data, Dataset):
        return DatasetImageSet(data)
    raise UserError(f"data must be an image tensor [N, C, H, W], a pair (images, labels) or a torch Dataset, got "
                    f"{type(data).__name__}.")  # fmt: skip
