"""Your own network as a user brings it (issue 12 item 4): a plain nn.Module with its own data range and time input,
distilled through ModuleTeacher + distill() with data handed over as tensors or a Dataset, and its export sampled,
evaluated and benchmarked by our own commands. Each test fails without its fix: (a) the data and the noise in the
network's range, (b) the time-embedding low-pass on a network of our own, (c) the export records the sigma_d the
run trained with, (d) distill() takes tensors and Datasets, (e) module exports through sample / evaluate / bench,
(f) class-conditional networks: labels in, CFG distilled at one scale, exports called with class_labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, tree
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from user_net import DATA_RANGE, FREQUENCIES, ClassNet, UserNet

from scm_distill import load_student
from scm_distill.config import resolve
from scm_distill.data import as_image_set, load_images
from scm_distill.errors import UserError
from scm_distill.families.module import ModuleTeacher
from scm_distill.student import TimeFeatures
from scm_distill.trainer import distill

AC = DDPMScheduler().alphas_cumprod  # 1,000-step linear VP schedule
MAX_FREQUENCY = 20.0  # rad per unit of the network's t = i / 1000 (0.02 per timestep): keeps 10 and 1, drops 1000, 100
NETWORK = f"{REPO / 'tests' / 'user_net.py'}:UserNet"
CLASS_NETWORK = f"{REPO / 'tests' / 'user_net.py'}:ClassNet"


def user_teacher(**kwargs) -> ModuleTeacher:
    """ModuleTeacher with what a user states about UserNet: eps, the VP schedule, t = i / 1000, data in
    [-0.5, 0.5] (and, for the low-pass, where the time features are)."""
    return ModuleTeacher(UserNet(), prediction="epsilon", alphas_cumprod=AC, sample_shape=(1, 8, 8),
                         data_range=DATA_RANGE, time_scale=1e-3, **kwargs)  # fmt: skip


def config(output, **student):
    return resolve(cli={"teacher": "my-net", "output": str(output),
                        "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                  "checkpoint_every": 0}, "student": student})  # fmt: skip


def digits(n: int = 32) -> torch.Tensor:
    return load_images("digits").uint8_images()[:n]  # uint8 [n, 1, 8, 8]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """Two sCD steps of UserNet through the public API: tensors in, sigma_d 0.3, low-pass on."""
    teacher = user_teacher(sigma_d=0.3, time_features=TimeFeatures("time_in", FREQUENCIES))
    out = tmp_path_factory.mktemp("user") / "run"
    return teacher, distill(config(out, time_embedding_max_frequency=MAX_FREQUENCY), teacher=teacher, data=digits())


def test_a_data_and_noise_arrive_in_the_networks_own_range():
    teacher = user_teacher()
    white_black = torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)])  # the toolkit's [-1, 1] images
    x0, _ = teacher.prepare_batch({"image": white_black}, torch.Generator().manual_seed(0))
    assert x0.amax(dim=(1, 2, 3)).tolist() == [0.5, -0.5]  # the network's data frame
    assert torch.allclose(teacher.decode(x0), white_black)  # and back for images
    seen = []
    teacher.network.inp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    process = teacher.model.process
    t = torch.full((2,), process.t_min)
    teacher.model.F(torch.cos(t).view(-1, 1, 1, 1) * x0, t, {})  # x_t at the least noise, z = 0
    assert torch.allclose(seen[-1].amax(dim=(1, 2, 3)), torch.tensor([0.5, -0.5]) * math.sqrt(AC[0].item()),
                          atol=1e-4)  # fmt: skip
    z = teacher.model.sigma_d * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((256,), process.t_max)
    teacher.model.F(torch.sin(t).view(-1, 1, 1, 1) * z, t, {})  # pure noise at the top of the schedule
    assert seen[-1].std().item() == pytest.approx(math.sqrt(1 - AC[-1].item()), rel=0.05)  # unit noise for the net


def test_b_the_low_pass_cuts_a_user_networks_own_time_features(user_run):
    teacher, result = user_run
    removed = FREQUENCIES > MAX_FREQUENCY
    weight = load_file(result.export_dir / "student.safetensors")["time_in.weight"]
    assert removed.sum() == 4 and (weight[:, removed] == 0).all() and (weight[:, ~removed] != 0).all()
    assert (teacher.network.time_in.weight[:, removed] != 0).all()  # the teacher is untouched


def test_b_the_low_pass_needs_the_time_features_stated(tmp_path):
    with pytest.raises(UserError, match="needs to know where your network embeds its time"):
        distill(config(tmp_path / "run", time_embedding_max_frequency=MAX_FREQUENCY), teacher=user_teacher(),
                data=digits())  # fmt: skip
    with pytest.raises(UserError, match="'nope' is not an nn.Linear of UserNet"):
        distill(config(tmp_path / "run", time_embedding_max_frequency=MAX_FREQUENCY),
                teacher=user_teacher(time_features=TimeFeatures("nope", FREQUENCIES)), data=digits())  # fmt: skip
    assert tree(tmp_path) == []


def test_c_the_export_records_the_sigma_d_the_run_trained_with(user_run):
    _, result = user_run
    assert json.loads((result.run_dir / "config.json").read_text())["sigma_data"] == 0.5  # config's default
    assert json.loads((result.export_dir / "scm_distill.json").read_text())["sigma_data"] == 0.3
    reading = json.loads((result.export_dir / "scm_reading.json").read_text())
    assert reading["sigma_data"] == 0.3 and reading["time_scale"] == 1e-3 and reading["data_range"] == [-0.5, 0.5]


def test_d_distill_takes_tensors_pairs_and_datasets(tmp_path):
    images = digits(8)
    floats = images.float() / 127.5 - 1
    for data in (images, floats, (images, torch.arange(8) % 3)):
        item = as_image_set(data)[5]
        assert torch.allclose(item["image"], floats[5])
    assert as_image_set((images, torch.arange(8) % 3)).num_classes == 3

    class Pairs(torch.utils.data.Dataset):
        classes = ("a", "b")

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return floats[i], i % 2

    data = as_image_set(Pairs())
    assert len(data) == 8 and data.num_classes == 2 and int(data[3]["label"]) == 1
    with pytest.raises(UserError, match=r"lies in \[0, 2\], outside \[-1, 1\].*ModuleTeacher\(data_range=...\)"):
        as_image_set(floats + 1)
    with pytest.raises(UserError, match="must be an image tensor"):
        as_image_set([1, 2, 3])
    result = distill(config(tmp_path / "run"), teacher=user_teacher(), data=Pairs())
    assert (result.export_dir / "student.safetensors").is_file()


def test_e_module_exports_sample_evaluate_and_bench_with_our_commands(user_run, tmp_path):
    export = str(user_run[1].export_dir)
    done = run_cli("sample", "--model", export, "--network", NETWORK, "--trust-remote-code", "--num-images", "4",
                   "--output", str(tmp_path / "grid.png"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grid.png").is_file()
    done = run_cli("sample", "--model", export, "--output", str(tmp_path / "no.png"))
    assert done.returncode == 1 and "name it: --network FILE.py:NAME" in done.stderr
    done = run_cli("sample", "--model", export, "--network", NETWORK, "--output", str(tmp_path / "no.png"))
    assert done.returncode == 1 and "pass --trust-remote-code" in done.stderr
    done = run_cli("evaluate", "--model", export, "--network", NETWORK, "--trust-remote-code", "--reference",
                   "digits", "--steps", "1,2", "--num-samples", "8", "--feature-extractor", "efficientnet-lite0",
                   "--output", str(tmp_path / "eval"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"student@1", "student@2"}
    done = run_cli("bench", "--model", export, "--network", NETWORK, "--trust-remote-code", "--no-scaling",
                   "--repeats", "1", "--output", str(tmp_path / "bench"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    sampling = json.loads((tmp_path / "bench" / "bench.json").read_text())["sampling"]
    assert sampling["student_end_to_end_batch1"]["student_2_step_ms"] > 0
    assert not (tmp_path / "no.png").exists()


# --- (f) a class-conditional network of your own: labels in, CFG at one scale distilled, class_labels out ---------


def class_teacher(**kwargs) -> ModuleTeacher:
    return ModuleTeacher(ClassNet(), prediction="epsilon", alphas_cumprod=AC, sample_shape=(1, 8, 8),
                         data_range=DATA_RANGE, time_scale=1e-3, num_classes=10, **kwargs)  # fmt: skip


def test_f_labels_reach_the_network_and_cfg_reads_it_at_the_distilled_scale():
    teacher = class_teacher(guidance_scale=3.0)
    labels = torch.tensor([3, 7])
    x0, condition = teacher.prepare_batch({"image": torch.zeros(2, 1, 8, 8), "label": labels},
                                          torch.Generator().manual_seed(0))  # fmt: skip
    seen = []
    teacher.network.label.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x_t, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((2,), 0.9)
    guided = teacher.model.x0(x_t, t, condition)
    assert seen[-1].tolist() == [3, 7, 10, 10]  # both branches in one call: the labels, then the null class
    conditional = teacher.model.x0(x_t, t, {"class_labels": labels})
    unconditional = teacher.model.x0(x_t, t, {"class_labels": torch.full((2,), 10)})
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-6)  # u + s (c - u)
    assert class_teacher().condition_for({"class_labels": [3, 7]}).keys() == {"class_labels"}  # s = 1: unguided


def test_f_class_conditional_module_distills_and_its_export_takes_class_labels(tmp_path):
    images = digits(32)
    labels = torch.arange(32) % 10
    result = distill(config(tmp_path / "run"), teacher=class_teacher(guidance_scale=2.0), data=(images, labels))
    description = json.loads((result.export_dir / "scm_distill.json").read_text())
    assert description["inputs"] == "class_labels" and description["num_classes"] == 10
    assert description["cfg_scale"] == 2.0 and description["pipeline_tag"] is None
    pipe = load_student(result.export_dir, network=ClassNet())
    one = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    other = pipe(class_labels=[5, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert one.shape == (2, 8, 8, 1) and not np.allclose(one[0], other[0]) and np.allclose(one[1], other[1])
    with pytest.raises(UserError, match="class-conditional; call it with class_labels"):
        pipe(batch_size=2)
    with pytest.raises(UserError, match=r"labels in 0\.\.9"):
        pipe(class_labels=[10])
    done = run_cli("sample", "--model", str(result.export_dir), "--network", CLASS_NETWORK, "--trust-remote-code",
                   "--num-images", "4", "--output", str(tmp_path / "grid.png"))  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_f_class_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="need a class-conditional network: pass num_classes"):
        user_teacher(guidance_scale=2.0)
    with pytest.raises(UserError, match=r"null_class must be an integer label outside the classes 0\.\.9"):
        class_teacher(null_class=3)
    with pytest.raises(UserError, match="guidance range"):
        class_teacher(guidance_scale=0.5)
    with pytest.raises(UserError, match="has no labels"):
        distill(config(tmp_path / "run"), teacher=class_teacher(), data=digits())
    assert tree(tmp_path) == []


def test_f_a_resume_with_another_guidance_scale_is_refused(tmp_path):
    """The scale (like the schedule, time input and data range) is part of the run: resuming under another one
    would train toward another target, so the fingerprint refuses it and names the teacher."""
    data = (digits(32), torch.arange(32) % 10)

    def run(scale: float, steps: int, resume: str | None = None):
        cfg = resolve(cli={"teacher": "my-net", "output": str(tmp_path / "run"),
                           "train": {"max_steps": steps, "convert_steps": 0, "batch_size": 4, "sample_every": 0,
                                     "checkpoint_every": 1}})  # fmt: skip
        return distill(cfg, teacher=class_teacher(guidance_scale=scale), data=data, resume=resume)

    run(2.0, 1)
    before = tree(tmp_path)
    with pytest.raises(UserError, match="teacher"):
        run(3.0, 2, resume="latest")
    assert tree(tmp_path) == before
    assert run(2.0, 2, resume="latest").export_dir.is_dir()  # the same statement resumes
