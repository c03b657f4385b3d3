"""Schedules and data flags (issue 16 item 6): diffusers' lr schedules and --scale_lr, random_flip, the image and
caption columns, and the Hub teacher's revision / variant / cache_dir."""

import json

import pytest
import torch
from conftest import tiny_unet
from test_trainer import tiny_config

from scm_distill import trainer
from scm_distill.config import OptimConfig, override
from scm_distill.data import load_images
from scm_distill.data.transforms import random_flip
from scm_distill.families import load_teacher
from scm_distill.optim import learning_rate


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_schedules_are_diffusers_get_scheduler(name):
    from diffusers.optimization import get_scheduler

    cfg = OptimConfig(lr=2e-4, warmup_steps=3, decay=name)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    reference = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=10)
    for step in range(10):
        assert learning_rate(step, cfg, total_steps=10) == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
        optimizer.step()
        reference.step()


def test_scale_lr_multiplies_by_the_global_batch():
    cfg = OptimConfig(lr=1e-4, convert_lr=1e-3, scale_lr=True)
    assert learning_rate(5, cfg, global_batch=64) == pytest.approx(64e-4)
    assert learning_rate(0, cfg, converting=True, global_batch=64) == pytest.approx(64e-3)
    assert learning_rate(5, OptimConfig(lr=1e-4), global_batch=64) == 1e-4


def test_the_run_follows_the_cosine_schedule(tiny_teacher, tmp_path):
    config = tiny_config(tiny_teacher, tmp_path / "run", max_steps=4, convert_steps=0)
    config = override(config, {"optim": {"decay": "cosine", "warmup_steps": 1}})
    result = trainer.distill(config)
    logged = [json.loads(line)["lr"] for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([learning_rate(s, config.optim, total_steps=4) for s in range(4)])
    assert logged[0] == 0 and logged[1] == pytest.approx(1e-4) and logged[3] < logged[2] < logged[1]


def test_random_flip_flips_each_image_by_the_steps_generator():
    images = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 3).repeat(4, 1, 1, 1)  # [8, 1, 4, 3]
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    chosen = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < chosen.sum() < 8
    for i in range(8):
        assert torch.equal(flipped[i], images[i].flip(-1) if chosen[i] else images[i])


def test_the_run_flips_its_batches(tiny_teacher, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(trainer, "random_flip", lambda images, generator: seen.append(images.shape) or images)
    config = tiny_config(tiny_teacher, tmp_path / "run", max_steps=1, convert_steps=0)
    trainer.distill(override(config, {"data": {"random_flip": True}}))
    assert seen == [(8, 1, 8, 8)]


@pytest.fixture
def captioned_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"text {i}", "alt": f"alt {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_caption_and_image_columns(captioned_folder):
    assert load_images(str(captioned_folder)).caption(1) == "text 1"  # the first of text, caption, ...
    assert load_images(str(captioned_folder), caption_column="alt").caption(1) == "alt 1"
    assert load_images(str(captioned_folder), image_column="image").caption(2) == "text 2"
    with pytest.raises(ValueError, match=r"has no column 'words' \(data.caption_column\); its columns are"):
        load_images(str(captioned_folder), caption_column="words")
    with pytest.raises(ValueError, match="apply to hf: and folder data, not the built-in 'digits'"):
        load_images("digits", image_column="image")


def test_the_teacher_variant_loads_the_variant_weights(tiny_teacher, tmp_path):
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, folder)
    other = tiny_unet(seed=7)
    other.save_pretrained(folder / "unet", variant="ema")
    plain, variant = load_teacher(str(folder)), load_teacher(str(folder), variant="ema")
    for key, value in other.state_dict().items():
        assert torch.equal(variant.unet.state_dict()[key], value), key
    assert not torch.equal(plain.unet.state_dict()["conv_in.weight"], other.state_dict()["conv_in.weight"])


def test_hub_teachers_take_the_revision_and_cache_dir(tiny_teacher, monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("revision"), kwargs.get("cache_dir")))
        return str(tiny_teacher)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    teacher = load_teacher("someone/tiny-ddpm", revision="v1.0", cache_dir=str(tmp_path / "cache"))
    assert calls == [("someone/tiny-ddpm", "v1.0", str(tmp_path / "cache"))] and teacher.family == "unet2d-vp"
    config = tiny_config("someone/tiny-ddpm", tmp_path / "run", max_steps=1, convert_steps=0)
    config = override(config, {"teacher_revision": "v2", "cache_dir": str(tmp_path / "c2")})
    trainer.distill(config)
    assert calls[1] == ("someone/tiny-ddpm", "v2", str(tmp_path / "c2"))
