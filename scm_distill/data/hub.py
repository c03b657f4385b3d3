"""Data sets read through Hugging Face `datasets`: local image folders and Hub data sets, decoded lazily.

Folders follow the `imagefolder` convention exactly, because they are read by `datasets`' own imagefolder
builder: images of any PIL extension, class labels from the parent folder names (sorted) when there is no
metadata file, more than one such folder and all images at one depth; a metadata.jsonl / .csv / .parquet with
a "file_name" column adds its other columns (then no folder labels); train/ and test/ folders become splits.
For both kinds: the image column is the first `Image` feature, the label column the first `ClassLabel`, the
caption column the first string column among CAPTION_COLUMNS. Channels and the common size after transforms
are found from the headers of the first SCAN_LIMIT images (all of them in smaller sets); an image met later
with another size raises when read.
"""

from __future__ import annotations

import io
import os
import socket
from contextlib import contextmanager
from itertools import islice
from urllib.parse import urlparse

import torch
from PIL import Image

from ..errors import UserError
from .imageset import ImageSet, evenly_spaced
from .transforms import Transform, is_grayscale, pil_to_uint8

CAPTION_COLUMNS = ("text", "caption", "prompt", "sentence", "description")
SCAN_LIMIT = 10_000  # images whose headers fix the channels and the size
SCAN_CHUNK = 1_000  # rows read from the table at once while scanning
HUB_PROBE_SECONDS = 3.0  # a Hub that does not accept a connection this fast counts as unreachable (no retries)


# Open an undecoded `Image` cell ({"bytes", "path"}) lazily (only the header is read until pixels are used).
def open_image(cell: dict) -> Image.Image:
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    return Image.open(cell["path"])


# One sentence for an image that cannot be decoded (corrupt, truncated, not an image), naming its file.
def unreadable_image(cell: dict, index: int, what: str, error: Exception) -> UserError:
    where = f"'{cell['path']}'" if cell.get("path") else f"image {index}"
    reason = " ".join(str(error).split()) or type(error).__name__
    return UserError(f"{where} of {what} cannot be read ({reason}); replace or remove it, then rerun.")


# Name of the first column whose feature is a `datasets.Image`.
def find_image_column(features, what: str) -> str:
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    raise UserError(f"{what} has no image column (a datasets.Image feature) among {list(features)}")


# Name of the first `ClassLabel` column, or None.
def find_label_column(features) -> str | None:
    import datasets

    return next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)


# Name of the first string column among CAPTION_COLUMNS, or None.
def find_caption_column(features) -> str | None:
    import datasets

    for column in CAPTION_COLUMNS:
        feature = features.get(column)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            return column
    return None


# Modes and sizes (w, h) of the first `limit` images, read from their headers only.
def scan_headers(table, column: str, limit: int) -> list[tuple[str, tuple[int, int]]]:
    found = []
    for start in range(0, min(limit, len(table)), SCAN_CHUNK):
        for offset, cell in enumerate(table[start : min(start + SCAN_CHUNK, limit)][column]):
            try:
                with open_image(cell) as img:
                    found.append((img.mode, img.size))
            except (OSError, SyntaxError, ValueError) as error:  # PIL: UnidentifiedImageError is an OSError
                raise unreadable_image(cell, start + offset, "the data", error) from None
    return found


# Channels (1 when every scanned image is grayscale, else 3) and the one (H, W) all share after transforms.
def channels_and_resolution(headers: list, transform: Transform, what: str) -> tuple[int, tuple[int, int]]:
    channels = 1 if all(is_grayscale(mode) for mode, _ in headers) else 3
    sizes = {transform.output_size(h, w) for _, (w, h) in headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in islice(sorted(sizes), 4))
        raise UserError(
            f"{what} has images of different sizes after transforms ({shown}); set resize_to (with "
            "center_crop) or pad_to so that they share one"
        )
    return channels, sizes.pop()


class LazyImageSet(ImageSet):
    """An ImageSet over a `datasets.Dataset` whose images are decoded and transformed when read."""

    def __init__(self, table, *, name: str, split: str, transform: Transform, what: str,
                 image_column: str | None = None, caption_column: str | None = None) -> None:  # fmt: skip
        import datasets

        if len(table) == 0:
            raise UserError(f"{what} has no images in split {split!r}")
        for flag, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if column is not None and column not in table.features:
                raise UserError(f"{what} has no column '{column}' ({flag}); its columns are {list(table.features)}")
        self.image_column = image_column or find_image_column(table.features, what)
        self.label_column = find_label_column(table.features)
        self.caption_column = caption_column or find_caption_column(table.features)
        self.table = table.cast_column(self.image_column, datasets.Image(decode=False))
        self.transform = transform
        headers = scan_headers(self.table, self.image_column, SCAN_LIMIT)
        channels, resolution = channels_and_resolution(headers, transform, what)
        class_names = None
        if self.label_column is not None:
            class_names = tuple(table.features[self.label_column].names)
        super().__init__(
            name=name,
            split=split,
            channels=channels,
            resolution=resolution,
            class_names=class_names,
            has_captions=self.caption_column is not None,
        )

    def __len__(self) -> int:
        return len(self.table)

    def uint8_image(self, index: int) -> torch.Tensor:
        cell = self.table[index][self.image_column]
        try:
            with open_image(cell) as img:
                pixels = pil_to_uint8(img, self.channels)
        except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt files fail when decoded
            raise unreadable_image(cell, index, f"data '{self.name}'", error) from None
        x = self.transform(pixels[None])[0]
        if tuple(x.shape[1:]) != self.resolution:
            h, w = self.resolution
            raise UserError(
                f"image {index} of data '{self.name}' is {x.shape[1]}x{x.shape[2]} after transforms, unlike "
                f"the {h}x{w} of the others; set resize_to (with center_crop) or pad_to"
            )
        return x

    def label(self, index: int) -> int:
        if self.label_column is None:
            return super().label(index)
        return int(self.table[index][self.label_column])

    def caption(self, index: int) -> str:
        if self.caption_column is None:
            return super().caption(index)
        return self.table[index][self.caption_column] or ""


# `datasets` without its progress bars on stderr (our errors are one line there); the setting is restored after.
@contextmanager
def quiet_datasets():
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


# Keep an evenly strided subset of at most max_items rows.
def take(table, max_items: int | None):
    if max_items is None or max_items >= len(table):
        return table
    return table.select(evenly_spaced(len(table), max_items).tolist())


# A local folder in the imagefolder layout ("all" = every split concatenated).
def load_folder(
    path: str, *, name: str, split: str, transform: Transform, max_items: int | None, **columns: str | None
) -> LazyImageSet:
    import datasets

    what = f"folder '{path}'"
    try:
        with quiet_datasets():
            table = datasets.load_dataset("imagefolder", data_dir=path, split=split)
    except ValueError as err:
        raise UserError(f"cannot read {what} as split {split!r}: {err}") from None
    return LazyImageSet(take(table, max_items), name=name, split=split, transform=transform, what=what, **columns)


# "hf:NAME" or "hf:NAME:CONFIG" -> (NAME, CONFIG or None).
def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    parts = spec[len("hf:") :].split(":")
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise UserError(f"data spec {spec!r} is not of the form 'hf:NAME' or 'hf:NAME:CONFIG'")
    return parts[0], parts[1] if len(parts) == 2 else None


# Why the Hub cannot be reached: None when a TCP connection to its endpoint opens within HUB_PROBE_SECONDS
# (one attempt instead of `datasets`' minute of retries).
def hub_unreachable() -> str | None:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return f"{host}: {error.strerror or type(error).__name__}"
    return None


# A Hub data set, `datasets.load_dataset(NAME, CONFIG, split=split)`.
def load_hub(spec: str, *, split: str, transform: Transform, max_items: int | None,
             **columns: str | None) -> LazyImageSet:  # fmt: skip
    import datasets

    dataset, config = parse_hub_spec(spec)
    what = f"Hugging Face dataset '{dataset}'" + (f" (config '{config}')" if config else "")
    if not datasets.config.HF_HUB_OFFLINE:
        unreachable = hub_unreachable()
        if unreachable:
            raise UserError(f"{what} needs the Hugging Face Hub, which cannot be reached ({unreachable}); a copy "
                            "cached earlier loads with HF_HUB_OFFLINE=1")  # fmt: skip
    try:
        with quiet_datasets():
            table = datasets.load_dataset(dataset, config, split=split)
    except (ConnectionError, FileNotFoundError) as err:
        reason = " ".join(str(err).split())[:200]
        why = "the Hugging Face Hub cannot be reached" if isinstance(err, ConnectionError) else "it was not found"
        raise UserError(f"{what} could not be loaded because {why} ({reason}); a copy cached earlier loads with "
                        "HF_HUB_OFFLINE=1") from None  # fmt: skip
    return LazyImageSet(take(table, max_items), name=spec, split=split, transform=transform, what=what, **columns)
