"""examples/train_family_teacher.py at toy size (a few steps on 64 real images): a latent family (sd), a flow family
(sd3) and the module row end to end, the folders loading with plain diffusers and the toolkit; the objectives
against diffusers' own schedulers; bad input."""

from __future__ import annotations

import json
import math
import sys

import diffusers
import pytest
import torch
from conftest import REPO, tree

sys.path.insert(0, str(REPO / "examples"))

from family_teachers import objectives as obj  # noqa: E402
from family_teachers.module_family import load_module_teacher  # noqa: E402
from family_teachers.transformer_families import flux_shift  # noqa: E402
from train_family_teacher import FAMILIES, main  # noqa: E402

from scm_distill.families import load_teacher  # noqa: E402

TOY = ["--size", "toy", "--max-items", "64"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Toy teachers of sd, sd3 and module (the first trains the shared toy VAE, the second reuses it)."""
    from scm_distill.data.builtin import fashion_dir, read_fashion_idx

    if read_fashion_idx(fashion_dir(), "train") is None:
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("teachers")
    for family in ("sd", "sd3", "module"):
        main(["--family", family, "--output", str(root / family), *TOY])
    return root


@pytest.mark.parametrize("family,pipeline", [("sd", "StableDiffusionPipeline"),
                                             ("sd3", "StableDiffusion3Pipeline")])  # fmt: skip
def test_latent_teacher_folders_load_with_plain_diffusers_and_the_toolkit(teachers, family, pipeline):
    folder = teachers / family
    info = json.loads((folder / "teacher_info.json").read_text())
    assert info["family"] == family and info["parameters"]["denoiser"] > 0 and info["train_minutes"] >= 0
    assert info["vae"] == str(teachers / "vae-kl")  # trained once by the first family, reused by the second
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == pipeline
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo of a bag"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    teacher = load_teacher(str(folder))
    assert teacher.family == family and teacher.sample_shape == (4, 8, 8)
    cond = teacher.condition_for({"prompt": ["a photo of a bag"]})
    assert torch.isfinite(teacher.model.F(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), cond)).all()


def test_module_teacher_loads_through_its_json(teachers):
    folder = teachers / "module"
    spec = json.loads((folder / "module.json").read_text())
    assert spec["prediction"] == "epsilon" and spec["data_range"] == [-0.5, 0.5]
    assert (folder / spec["source"]).is_file() and (folder / spec["weights"]).is_file()
    teacher = load_module_teacher(folder)
    assert teacher.sample_shape == (1, 32, 32)
    assert torch.isfinite(teacher.model.F(torch.randn(2, 1, 32, 32), torch.tensor([0.3, 1.2]), {})).all()


def test_a_vae_family_trains_with_the_steps_batch_and_lr_it_is_given(teachers):
    """--steps, --batch-size and --lr reach the VAE's trainer (they were dropped for vae-*: --steps 60 trained the
    size's 3,500 steps); vae_info.json records the settings it trained with."""
    out = teachers.parent / "vae-overrides"
    main(["--family", "vae-kl", "--output", str(out), "--steps", "2", "--batch-size", "3", "--lr", "5e-4",
          "--check-samples", "0", *TOY])  # fmt: skip
    train = json.loads((out / "vae_info.json").read_text())["config"]["train"]
    assert (train["steps"], train["batch_size"], train["lr"]) == (2, 3, 5e-4)


def test_the_public_module_teacher_reads_the_network_in_its_own_frame(teachers):
    """ModuleTeacher(data_range, time_scale 1 / T) of the folder: [-1, 1] images arrive as the network's
    [-0.5, 0.5], sigma_d is a quarter of that width, and the network gets t = i / T."""
    teacher = load_module_teacher(teachers / "module")
    x0, condition = teacher.prepare_batch({"image": torch.ones(1, 1, 32, 32), "label": torch.tensor([3])},
                                          torch.Generator())  # fmt: skip
    assert x0.max().item() == 0.5 and teacher.model.sigma_d == 0.25
    assert condition["class_labels"].tolist() == [3] and condition["uncond"]["class_labels"].tolist() == [10]
    assert condition["guidance_scale"].tolist() == [2.0]  # the default sampler's CFG scale, from module.json
    x, tau = torch.randn(2, 1, 32, 32), torch.tensor([40.0, 900.0])
    assert torch.allclose(teacher.model.network_call(teacher.network, x, tau, {}), teacher.network(x, tau / 1000))


def test_posterior_and_learned_variance_match_diffusers_ddpm():
    """DiT's L_vlb pieces against DDPMScheduler: the posterior mean is step()'s mean for an x0 ("sample") output, and
    the learned-range log variance is its learned_range variance."""
    ddpm = diffusers.DDPMScheduler(prediction_type="sample", variance_type="learned_range", clip_sample=False)
    ac = ddpm.alphas_cumprod
    x0, x_t, raw = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.rand(1, 4, 2, 2) * 2 - 1
    for t in (1, 500, 999):
        mean, _ = obj.posterior(x0, x_t, torch.tensor([t]), ac)
        ddpm_log_var = ddpm._get_variance(t, predicted_variance=raw, variance_type="learned_range")
        assert torch.allclose(obj.learned_log_variance(raw, torch.tensor([t]), ac), ddpm_log_var, atol=1e-5)
        out = ddpm.step(torch.cat([x0, raw], 1), t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, mean + torch.exp(0.5 * ddpm_log_var) * noise, atol=1e-5)


def test_flux_training_shift_is_the_pipelines_and_the_adapters():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from family_teachers.transformer_families import FLUX_SCHEDULER

    from scm_distill.families.flow import dynamic_shift

    assert flux_shift(16) == pytest.approx(math.exp(calculate_shift(16)), rel=1e-12)
    assert flux_shift(16) == pytest.approx(dynamic_shift(FLUX_SCHEDULER, 16), rel=1e-12)


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["--family", "sd4", "--output", str(tmp_path / "x")])
    assert "unknown family 'sd4'; known families: " + ", ".join(FAMILIES) in str(error.value)
    assert tree(tmp_path) == []


def test_missing_dataset_names_the_debian_package_and_the_datasets_fallback(tmp_path):
    import subprocess

    env = {"SCM_FASHION_MNIST_DIR": str(tmp_path / "none"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "train_family_teacher.py"), "--family", "module",
                           "--size", "toy", "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "dataset-fashion-mnist" in last and "`datasets` fallback" in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["sd", "sdxl", "dit", "sd3", "flux", "sana", "edm"])
def test_every_family_at_cpu_size_samples_with_the_stock_pipeline_on_its_vae_kind(name):
    """The real (cpu) sizes, untrained: each family's pipeline on a VAE of its kind and channel count runs one
    stock step. Toy VAEs have 4 latent channels, which hid that StableDiffusionXLPipeline reads EDM's per-channel
    latents_mean as 4 channels (the 8-channel VAE failed in the pipeline's decode: RuntimeError in view)."""
    from family_teachers.latent_teacher import LATENT_FAMILIES, family_vae
    from family_teachers.vae import TrainedVAE, build_vae, vae_size

    family = LATENT_FAMILIES[name]()
    torch.manual_seed(0)
    vae = build_vae(family.vae_kind, vae_size(family.vae_kind, "cpu")).eval()
    channels = vae.config.latent_channels
    stats = {"mean": 0.0, "std": 1.0, "channel_mean": [0.0] * channels, "channel_std": [1.0] * channels}
    trained = TrainedVAE(None, vae, torch.zeros(0), torch.zeros(0), {"latent_statistics": stats})
    pipe = family.build_pipeline(family_vae(trained, family), family.sizes["cpu"], 0)
    pipe.set_progress_bar_config(disable=True)
    scale = family.sizes["cpu"].guidance_scale
    images = pipe(**family.call_inputs([7], scale), num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())
