"""Tests of the data layer: built-in sets, imagefolder and Hub reading, pixel rules, batch order."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from scm_distill.data import (
    BUILTIN_NAMES,
    ImageSet,
    Transform,
    batch_indices,
    check_compatible,
    collate,
    load_images,
)
from scm_distill.data.builtin import FASHION_FILES, fashion_dir
from scm_distill.data.order import epoch_permutation


# Keep the Arrow caches that `datasets` writes for image folders out of the user's home.
@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


# Pixel value u (uint8) as the float the ImageSet returns.
def signed(u: float) -> float:
    return u / 127.5 - 1.0


def save(path: Path, mode: str, size: tuple[int, int], color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def check_items(data: ImageSet, count: int, shape: tuple[int, int, int]) -> None:
    assert len(data) == count
    assert (data.channels, *data.resolution) == shape
    for index in (0, count // 2, count - 1):
        image = data[index]["image"]
        assert image.dtype == torch.float32 and tuple(image.shape) == shape
        assert image.min() >= -1.0 and image.max() <= 1.0


# ---------------------------------------------------------------- built-in sets


def test_digits_count_shape_range_labels():
    data = load_images("digits")
    check_items(data, 1797, (1, 8, 8))
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    images = data.uint8_images()
    assert images.min() == 0 and images.max() == 255  # 0..16 spans the whole range
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert load_images("digits", split="all").uint8_images().equal(images)


def test_digits_scaling_matches_sklearn():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:5]).float()  # 0..16
    got = torch.stack([load_images("digits")[i]["image"][0] for i in range(5)])
    assert torch.allclose((got + 1) / 2, raw / 16, atol=0.5 / 255)


def test_whole_sets_refuse_test_split():
    with pytest.raises(ValueError, match="no held-out split"):
        load_images("digits", split="test")


def test_mnist5k():
    data = load_images("mnist5k")
    check_items(data, 5000, (1, 28, 28))
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    assert torch.bincount(labels).tolist() == [500] * 10
    assert data[0]["image"].min() == -1.0 and data[0]["image"].max() == 1.0


def fashion_available() -> bool:
    return all((fashion_dir() / f"{stem}.gz").is_file() for pair in FASHION_FILES.values() for stem in pair)


@pytest.mark.skipif(
    not fashion_available(),
    reason="Fashion-MNIST IDX files are not installed (apt-get install dataset-fashion-mnist); "
    "the Hub fallback needs network and is not tried here",
)
def test_fashion_mnist_splits():
    train, test = load_images("fashion-mnist"), load_images("fashion-mnist", split="test")
    check_items(train, 60_000, (1, 28, 28))
    check_items(test, 10_000, (1, 28, 28))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.num_classes == 10
    assert len(load_images("fashion-mnist", split="all", max_items=700)) == 700


# Write tiny IDX gzip files: n images of 4x3 with pixel value 10 * label.
def write_fake_fashion(folder: Path, n: int) -> None:
    labels = np.arange(n, dtype=np.uint8) % 10
    images = np.repeat(labels * 10, 12).reshape(n, 4, 3).astype(np.uint8)
    for split in ("train", "test"):
        image_stem, label_stem = FASHION_FILES[split]
        header = b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in images.shape)
        (folder / f"{image_stem}.gz").write_bytes(gzip.compress(header + images.tobytes()))
        label_header = b"\0\0\x08\x01" + n.to_bytes(4, "big")
        (folder / f"{label_stem}.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))


def test_fashion_idx_reader_and_env_override(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path, 20)
    monkeypatch.setenv("SCM_FASHION_MNIST_DIR", str(tmp_path))
    data = load_images("fashion-mnist", split="all")
    check_items(data, 40, (1, 4, 3))
    item = data[13]
    assert item["label"] == 3 and torch.allclose(item["image"], torch.full((1, 4, 3), signed(30)))


def test_fashion_hub_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("SCM_FASHION_MNIST_DIR", str(tmp_path))  # empty: no IDX files
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        images = [Image.new("L", (28, 28), 7 * k) for k in range(3)]
        return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("scm_distill.data.hub.hub_unreachable", lambda: None)  # the network is faked, never probed
    data = load_images("fashion-mnist", split="test")
    assert calls == [("zalando-datasets/fashion_mnist", "test")]
    check_items(data, 3, (1, 28, 28))
    assert data.uint8_images()[2].unique().tolist() == [14]


def test_fashion_missing_everywhere_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SCM_FASHION_MNIST_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("scm_distill.data.hub.hub_unreachable", lambda: None)
    with pytest.raises(FileNotFoundError, match="Hub.*apt-get install dataset-fashion-mnist") as info:
        load_images("fashion-mnist")
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------- folders


def test_imagefolder_class_subfolders_give_sorted_labels(tmp_path):
    for k in range(3):
        save(tmp_path / "zebra" / f"{k}.png", "L", (6, 5), 200)
        save(tmp_path / "ant" / f"{k}.png", "L", (6, 5), 50)
    data = load_images(str(tmp_path))
    check_items(data, 6, (1, 5, 6))
    assert data.class_names == ("ant", "zebra") and data.num_classes == 2 and not data.has_captions
    for i in range(len(data)):
        item = data[i]
        expected = signed(50) if item["label"] == 0 else signed(200)
        assert torch.allclose(item["image"], torch.full((1, 5, 6), expected))
    kept = load_images(str(tmp_path), max_items=2)  # evenly strided: one of each class
    assert sorted(int(kept[i]["label"]) for i in range(2)) == [0, 1]


def test_metadata_jsonl_gives_captions(tmp_path):
    rows = [{"file_name": f"{k}.png", "text": f"a photo number {k}"} for k in range(3)]
    for k in range(3):
        save(tmp_path / f"{k}.png", "RGB", (4, 4), (10 * k, 0, 0))
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_images(str(tmp_path))
    assert data.has_captions and data.num_classes is None and data.channels == 3
    captions = {data[i]["caption"]: data.uint8_images()[i, 0, 0, 0].item() for i in range(3)}
    assert captions == {f"a photo number {k}": 10 * k for k in range(3)}
    batch = collate([data[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 4, 4) and sorted(batch["caption"]) == sorted(captions)
    assert "label" not in batch


def test_color_rules_gray_rgb_and_alpha_over_white(tmp_path):
    gray = tmp_path / "gray"
    save(gray / "a.png", "L", (4, 4), 30)
    save(gray / "b.png", "1", (4, 4), 1)
    assert load_images(str(gray)).channels == 1
    mixed = tmp_path / "mixed"
    save(mixed / "a.png", "L", (4, 4), 30)
    save(mixed / "b.png", "RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white
    save(mixed / "c.png", "RGBA", (4, 4), (255, 0, 0, 255))
    data = load_images(str(mixed))
    assert data.channels == 3
    images = data.uint8_images()  # folder order: a, b, c
    assert images[0].unique().tolist() == [30]
    assert images[1].unique().tolist() == [255]
    assert images[2, :, 0, 0].tolist() == [255, 0, 0]


def test_mixed_sizes_need_resize_or_pad(tmp_path):
    save(tmp_path / "a.png", "L", (8, 6), 100)  # 6 high, 8 wide
    save(tmp_path / "b.png", "L", (5, 5), 100)
    with pytest.raises(ValueError, match="different sizes after transforms"):
        load_images(str(tmp_path))
    assert load_images(str(tmp_path), resize_to=4).resolution == (4, 4)
    assert load_images(str(tmp_path), pad_to=10).resolution == (10, 10)


def test_non_square_images_of_one_size_are_kept(tmp_path):
    for k in range(2):
        save(tmp_path / f"{k}.png", "L", (8, 6), 100)
    assert load_images(str(tmp_path)).resolution == (6, 8)
    assert load_images(str(tmp_path), resize_to=3, center_crop=False).resolution == (3, 4)
    assert load_images(str(tmp_path), resize_to=3).resolution == (3, 3)


# ---------------------------------------------------------------- transforms


def test_resize_short_side_then_center_crop():
    x = torch.zeros(2, 1, 10, 20, dtype=torch.uint8)
    x[..., 5:, :] = 200  # horizontal edge: bottom half bright
    assert Transform(resize_to=5, center_crop=False)(x).shape == (2, 1, 5, 10)
    y = Transform(resize_to=5)(x)
    assert y.shape == (2, 1, 5, 5)
    assert y[..., 0, :].max() == 0 and y[..., -1, :].min() == 200  # the edge survives antialiasing
    constant = torch.full((1, 3, 9, 7), 77, dtype=torch.uint8)
    assert Transform(resize_to=14)(constant).unique().tolist() == [77]
    assert Transform(resize_to=7)(constant[..., :7, :]).equal(constant[..., :7, :])  # same size: identity


def test_pad_symmetric_with_black():
    data, padded = load_images("digits"), load_images("digits", pad_to=13)
    assert padded.resolution == (13, 13)
    image = padded[0]["image"]  # 8 -> 13: 2 rows/columns before, 3 after
    assert torch.equal(image[:, 2:10, 2:10], data[0]["image"])
    border = torch.ones(13, 13, dtype=torch.bool)
    border[2:10, 2:10] = False
    assert (image[0][border] == -1.0).all()
    with pytest.raises(ValueError, match="does not fit into pad_to=6"):
        load_images("digits", pad_to=6)


def test_resize_then_pad():
    data = load_images("digits", resize_to=16, pad_to=20)
    assert data.resolution == (20, 20) and len(data) == 1797
    with pytest.raises(ValueError, match="positive integer"):
        load_images("digits", resize_to=0)


# ---------------------------------------------------------------- checks and errors


def test_check_compatible_message():
    data = load_images("digits", max_items=10)
    check_compatible(data, 1, 8)
    check_compatible(data, 1, (8, 8), what="student")
    expected = (
        "data 'digits' has 1 channel at 8x8 but the teacher expects 1 channel at 16x16; "
        "set data.resize_to or data.pad_to"
    )
    with pytest.raises(ValueError) as info:
        check_compatible(data, 1, 16)
    assert str(info.value) == expected
    with pytest.raises(ValueError, match="expects 3 channels at 8x8; use data with 3 channels$"):
        check_compatible(data, 3, 8)


def test_bad_spec_lists_forms_and_builtins(tmp_path):
    with pytest.raises(ValueError) as info:
        load_images(str(tmp_path / "missing"))
    message = str(info.value)
    assert all(name in message for name in BUILTIN_NAMES) and "hf:NAME" in message and "folder" in message
    with pytest.raises(ValueError, match="hf:NAME:CONFIG"):
        load_images("hf:a:b:c")


# ---------------------------------------------------------------- Hub sets (load_dataset replaced)


def test_hub_columns_detected(monkeypatch):
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "picture": datasets.Image(),
            "kind": datasets.ClassLabel(names=["x", "y"]),
            "prompt": datasets.Value("string"),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "id": [0, 1, 2],
            "picture": [Image.new("RGB", (6, 4), (k, 2 * k, 3 * k)) for k in range(3)],
            "kind": [1, 0, 1],
            "prompt": ["p0", "p1", "p2"],
        },
        features=features,
    )
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("scm_distill.data.hub.hub_unreachable", lambda: None)
    data = load_images("hf:someone/pics:small", split="test", resize_to=4)
    assert calls == [("someone/pics", "small", "test")] and data.name == "hf:someone/pics:small"
    check_items(data, 3, (3, 4, 4))
    assert data.class_names == ("x", "y") and data.has_captions
    item = data[2]
    assert item["label"] == 1 and item["caption"] == "p2"
    assert data.uint8_images()[2, :, 0, 0].tolist() == [2, 4, 6]


def test_hub_offline_error_names_dataset(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("scm_distill.data.hub.hub_unreachable", lambda: None)
    with pytest.raises(ValueError, match="'someone/pics' could not be loaded .* Hub cannot be reached"):
        load_images("hf:someone/pics")


# ---------------------------------------------------------------- batch order and reference sets


def test_batch_indices_ranks_disjoint_and_union_is_global_batch():
    for step in (0, 3, 7):
        parts = [batch_indices(step, 4, 50, seed=1, rank=r, world_size=3) for r in range(3)]
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == 12
        assert joined.equal(batch_indices(step, 12, 50, seed=1))


def test_batch_indices_epochs_are_permutations_without_tail():
    steps_per_epoch = 50 // 12  # 4 steps, 2 items dropped per epoch
    epochs = []
    for epoch in range(3):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = torch.cat([batch_indices(s, 6, 50, 5, rank=r, world_size=2) for s in steps for r in (0, 1)])
        assert len(set(seen.tolist())) == 48 and seen.min() >= 0 and seen.max() < 50
        epochs.append(seen)
    assert not epochs[0].equal(epochs[1]) and not epochs[1].equal(epochs[2])
    # torch's CPU generator keeps only 32 bits of a seed: seeds and epochs must still all differ
    firsts = [batch_indices(e * steps_per_epoch, 6, 50, seed) for seed in (5, 6, 2**32 + 5) for e in (0, 1)]
    assert len({tuple(f.tolist()) for f in firsts}) == len(firsts)


def test_batch_indices_resume_reproduces():
    first = [batch_indices(s, 8, 100, seed=3, rank=1, world_size=2) for s in range(20)]
    epoch_permutation.cache_clear()  # a resumed process starts with an empty cache
    first[5].fill_(-1)  # callers own their tensors
    resumed = [batch_indices(s, 8, 100, seed=3, rank=1, world_size=2) for s in range(5, 20)]
    assert all(a.equal(b) for a, b in zip(first[6:], resumed[1:], strict=True))
    assert resumed[0].min() >= 0
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(0, 8, 15, seed=0, world_size=2)


def test_uint8_images_deterministic(tmp_path):
    data = load_images("mnist5k")
    a, b = data.uint8_images(100, seed=4), data.uint8_images(100, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (100, 1, 28, 28) and a.equal(b)
    assert not a.equal(data.uint8_images(100, seed=5))
    assert data.uint8_images().shape == (5000, 1, 28, 28)
    for k in range(6):
        save(tmp_path / f"{k}.png", "L", (3, 3), 40 * k)
    lazy = load_images(str(tmp_path))
    assert lazy.uint8_images(3, seed=1).equal(lazy.uint8_images(3, seed=1))
    assert lazy.uint8_images().shape == (6, 1, 3, 3)
