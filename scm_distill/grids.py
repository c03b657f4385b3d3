"""Image grids: uint8 conversion and PNG grids with one labelled row per sampler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UserError
from .files import os_error_sentence, write_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype) -> uint8 [B, C, H, W] (clamped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 [B, C, H, W] -> one PIL image, row-major, with a 1-pixel gutter."""
    B, C, H, W = images.shape
    rows = -(-B // columns)
    canvas = np.zeros((rows * (H + 1) + 1, columns * (W + 1) + 1, C), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, columns)
        canvas[1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = image
    return Image.fromarray(canvas[..., 0] if C == 1 else canvas)


def labelled_rows(rows: dict[str, torch.Tensor], columns: int, scale: int = 2) -> Image.Image:
    """Stack grids of several samplers (same noise, one row block each) under text labels."""
    blocks = []
    for label, images in rows.items():
        grid = image_grid(images, columns).convert("RGB")
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        header = Image.new("RGB", (grid.width, 14), "white")
        ImageDraw.Draw(header).text((2, 1), label, fill="black")
        blocks += [header, grid]
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        out.paste(block, (0, y))
        y += block.height
    return out


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # by file suffix


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (temporary sibling, fsync, rename); a failed write is one sentence, no leftovers."""
    return save_image(image, path, "PNG")


def save_image(image: Image.Image, path: Path, image_format: str | None = None) -> Path:
    """Write an image atomically in the format of its suffix (IMAGE_FORMATS) unless one is given."""
    path = Path(path)
    image_format = image_format or IMAGE_FORMATS[path.suffix.lower()]
    buffer = io.BytesIO()
    (image.convert("RGB") if image_format == "JPEG" and image.mode not in ("L", "RGB") else image).save(
        buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, buffer.getvalue())
    except OSError as error:
        raise UserError(os_error_sentence(error, path)) from None
