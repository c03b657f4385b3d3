"""Pixel rules shared by every data source, so an image looks the same whichever way it was loaded.

- Colour: PIL modes "1", "L", "LA", "I", "I;16*" and "F" are grayscale, every other mode is colour. A data set
  whose images are all grayscale has 1 channel; one with any colour image is read as RGB (3 channels), its
  grayscale images repeated over the three channels. Transparent images (RGBA, LA, PA, or P with a
  transparency key) are composited over white first. 16-bit grayscale ("I", "I;16*") is divided by 257.
- resize_to: the short side becomes resize_to (bilinear, antialiased), the long side keeps the aspect ratio
  (rounded); with center_crop the result is then centre-cropped to resize_to x resize_to.
- pad_to: symmetric padding with 0 (black, -1 after scaling) to pad_to x pad_to, an odd margin's extra pixel
  going to the bottom/right; an image larger than pad_to in either side is an error.
- Order: colour mode, then resize (and crop), then pad. Images stay uint8 until `to_signed_unit` maps
  u -> u / 127.5 - 1 (0 -> -1, 255 -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
RESIZE_CHUNK = 4096  # images interpolated at once (bounds the float32 copy)


# True when an image of this PIL mode counts as grayscale.
def is_grayscale(mode: str) -> bool:
    return mode in GRAY_MODES


# True when the image carries transparency that must be flattened over white.
def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info)


# Composite a transparent image over a white background; returns an RGB image.
def over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# 16-bit / 32-bit integer and float grayscale to uint8: integers by 1/257 (65535 -> 255), floats clipped.
def high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        arr = arr / 257.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# A PIL image as a uint8 tensor [C, H, W] with C = channels (1 or 3), following the colour rules above.
def pil_to_uint8(img: Image.Image, channels: int) -> torch.Tensor:
    if has_alpha(img):
        img = over_white(img)
    if img.mode in HIGH_DEPTH_MODES:
        arr = high_depth_to_uint8(img)
    else:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        arr = np.repeat(arr[:, :, :1], channels, axis=2)
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # copy: writable


# Pixel scaling: uint8 [0, 255] -> float32 [-1, 1].
def to_signed_unit(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 127.5 - 1.0


# Size after resizing the short side of an h x w image to `size`, keeping the aspect ratio.
def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    if h <= w:
        return size, max(1, round(w * size / h))
    return max(1, round(h * size / w)), size


# Bilinear antialiased resize of uint8 images x: [N, C, H, W] to (h, w), in chunks.
def resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    chunks = []
    for start in range(0, x.shape[0], RESIZE_CHUNK):
        y = x[start : start + RESIZE_CHUNK].to(torch.float32)
        y = F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks) if chunks else x.new_empty((0, x.shape[1], h, w))


# Centre crop of x: [N, C, H, W] to size x size (the extra pixel of an odd margin is cut at the bottom/right).
def center_crop_square(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


# Zero padding of x: [N, C, H, W] to pad_to x pad_to, symmetric.
def pad_square(x: torch.Tensor, pad_to: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=0)


@dataclass(frozen=True)
class Transform:
    """Resize / crop / pad settings of one data set, applied to uint8 image batches [N, C, H, W]."""

    resize_to: int | None = None  # short side after resizing, pixels; None keeps the size
    pad_to: int | None = None  # square side after zero padding, pixels; None pads nothing
    center_crop: bool = True  # after resize_to, crop the centre resize_to x resize_to square

    def __post_init__(self) -> None:
        for field in ("resize_to", "pad_to"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"{field} must be a positive integer or None, got {value!r}")

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) of an h x w image after the transform; raises when it does not fit into pad_to."""
        if self.resize_to is not None:
            h, w = short_side_size(h, w, self.resize_to)
            if self.center_crop:
                h = w = self.resize_to
        if self.pad_to is not None:
            if h > self.pad_to or w > self.pad_to:
                raise UserError(
                    f"an image of {h}x{w} (after resizing) does not fit into pad_to={self.pad_to}; "
                    f"raise pad_to or set resize_to"
                )
            h = w = self.pad_to
        return h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Transform uint8 images x: [N, C, H, W] (all of one size) into uint8 [N, C, H', W']."""
        h, w = x.shape[-2:]
        self.output_size(h, w)  # validates pad_to before any work
        if self.resize_to is not None:
            new_h, new_w = short_side_size(h, w, self.resize_to)
            if (new_h, new_w) != (h, w):
                x = resize_uint8(x, new_h, new_w)
            if self.center_crop:
                x = center_crop_square(x, self.resize_to)
        if self.pad_to is not None:
            x = pad_square(x, self.pad_to)
        return x.contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image [B, C, H, W] horizontally with probability 1/2, drawn from `generator` (the step's)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
