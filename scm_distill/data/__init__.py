"""The data layer: `load_images(spec)` turns the CLI's `--data SPEC` into an ImageSet of images in [-1, 1].

SPEC is one of
- a built-in name: "digits", "mnist5k", "fashion-mnist" (offline, in memory; see builtin.py for splits);
- a local folder in the Hugging Face imagefolder layout (class subfolders -> labels, metadata.jsonl ->
  captions);
- "hf:NAME" or "hf:NAME:CONFIG": `datasets.load_dataset(NAME, CONFIG, split=split)` (needs the Hub or its
  cache).
Pixel rules (colour mode, resize_to, center_crop, pad_to) are in transforms.py; the training batch order is
`batch_indices` in order.py.
"""

from __future__ import annotations

import os

from ..errors import UserError
from .builtin import BUILTINS, load_builtin
from .hub import load_folder, load_hub
from .imageset import ImageSet, TensorImageSet, check_compatible, collate
from .order import batch_indices
from .python_data import as_image_set
from .transforms import Transform

BUILTIN_NAMES = tuple(BUILTINS)

__all__ = [
    "BUILTIN_NAMES",
    "ImageSet",
    "TensorImageSet",
    "Transform",
    "as_image_set",
    "batch_indices",
    "check_compatible",
    "collate",
    "load_images",
]


def load_images(
    spec: str,
    *,
    split: str = "train",
    resize_to: int | None = None,
    pad_to: int | None = None,
    center_crop: bool = True,
    max_items: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> ImageSet:
    """Resolve a data spec into an ImageSet.

    Args:
        spec: a built-in name, a folder path, or "hf:NAME[:CONFIG]" (see the module docstring).
        split: "train", "test", "all" ("all" = every split); digits and mnist5k refuse "test".
        resize_to: resize the short side to this many pixels (bilinear, antialias); None keeps the size.
        pad_to: zero-pad symmetrically to pad_to x pad_to (black, -1 after scaling); must not be smaller.
        center_crop: after resize_to, crop the centre square (ignored without resize_to).
        max_items: keep at most this many images, an evenly strided subset in the original order.
        image_column, caption_column: hf: and folder data: the columns to read (None: found by their types and
            names, see scm_distill.data.hub).
    """
    transform = Transform(resize_to=resize_to, pad_to=pad_to, center_crop=center_crop)
    if max_items is not None and max_items < 1:
        raise UserError(f"max_items must be a positive integer or None, got {max_items!r}")
    columns = {"image_column": image_column, "caption_column": caption_column}
    if spec in BUILTINS:
        if image_column or caption_column:
            raise UserError(f"data.image_column and data.caption_column apply to hf: and folder data, not the "
                            f"built-in '{spec}'")  # fmt: skip
        return load_builtin(spec, split, transform, max_items)
    if spec.startswith("hf:"):
        return load_hub(spec, split=split, transform=transform, max_items=max_items, **columns)
    if os.path.isdir(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        return load_folder(path, name=spec, split=split, transform=transform, max_items=max_items, **columns)
    raise UserError(
        f"data spec {spec!r} is neither a built-in name ({', '.join(BUILTIN_NAMES)}), an existing folder of "
        "images in the imagefolder layout, nor 'hf:NAME[:CONFIG]' for a Hugging Face dataset"
    )
