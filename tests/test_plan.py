"""The memory plan: published parameter counts from the configs on meta, the counting of saved activations, the
DDP/FSDP arithmetic, the allocator-level peak measure, and `scm-distill plan` on the recipes."""

import pytest
import torch
from torch import nn

from scm_distill.architectures import TEACHERS
from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.memory import peak_allocated_bytes, storage_bytes
from scm_distill.plan import FP32, SavedBytes, lora_parameters, memory_plan, meta_denoiser

# published parameter counts of the denoisers (architectures.py's docstring: the Hub configs built on meta)
PUBLISHED = {"google/ddpm-cifar10-32": 35_746_307, "stable-diffusion-v1-5/stable-diffusion-v1-5": 859_520_964,
             "stabilityai/stable-diffusion-xl-base-1.0": 2_567_463_684, "facebook/DiT-XL-2-256": 749_826_464,
             "stabilityai/stable-diffusion-3-medium-diffusers": 2_028_328_000,
             "black-forest-labs/FLUX.1-dev": 11_901_408_320,
             "Efficient-Large-Model/Sana_1600M_1024px_diffusers": 1_604_462_752}  # fmt: skip


@pytest.mark.parametrize("teacher", sorted(PUBLISHED))
def test_configs_on_meta_have_the_published_parameter_counts(teacher):
    assert sum(p.numel() for p in meta_denoiser(TEACHERS[teacher]).parameters()) == PUBLISHED[teacher]


def test_lora_counts_match_the_recipes():
    """Rank 64 on LCM-LoRA's layers: 67M on SD 1.5, 197M on SDXL; on FLUX's recipe layers 262M (README)."""
    sd = resolve("recipes/sd15-lora.yaml", {"output": "o"})
    flux = resolve("recipes/flux.yaml", {"output": "o"})
    counts = {name: lora_parameters(meta_denoiser(TEACHERS[c.teacher]), 64, c.lora.target_modules)
              for name, c in (("sd15", sd), ("flux", flux))}  # fmt: skip
    counts["sdxl"] = lora_parameters(meta_denoiser(TEACHERS["stabilityai/stable-diffusion-xl-base-1.0"]), 64,
                                     sd.lora.target_modules)  # fmt: skip
    assert [round(counts[k] / 1e6) for k in ("sd15", "sdxl", "flux")] == [67, 197, 262]


def test_saved_bytes_count_what_autograd_keeps():
    """Linear(8, 16) -> ReLU -> Linear(16, 4) at batch 3 keeps the input (for the first weight's gradient) and the
    ReLU output (for ReLU and the second weight; one storage): 3 x (8 + 16) float32 values = 288 bytes."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.empty(3, 8)
    with SavedBytes({p.untyped_storage()._cdata for p in net.parameters()}) as saved:
        net(x)
    assert saved.bytes == 3 * (8 + 16) * FP32


def test_peak_allocated_bytes_and_storage_bytes():
    """Two 1000 x 1000 float32 tensors live at once at most: 8,000,000 bytes (a few bytes of scalars on top)."""

    def two_at_a_time():
        a = torch.randn(1000, 1000)
        b = a * 2
        del a
        return b + 1

    assert 8_000_000 <= peak_allocated_bytes(two_at_a_time) < 8_000_000 + 1024
    x = torch.zeros(10, 10)
    assert storage_bytes([x, x[2:], x.T]) == 400  # views share one storage


def test_fsdp_divides_the_sharded_state_by_the_processes():
    config = resolve("recipes/sdxl.yaml", {"output": "o"})
    plan = memory_plan(config, processes=8, resolution=256)
    ddp, fsdp = plan.rows(fsdp=False), plan.rows(fsdp=True)
    for row in ("student parameters", "gradients", "optimizer (2 moments)", "EMA", "teacher"):
        assert fsdp[row] == ddp[row] / 8
    state = sum(v for k, v in ddp.items() if not k.startswith(("activations", "FSDP")))
    assert round(state / 1e9, 1) == 65.2  # README: 6 copies of 2,567M + 902M encoders, float32
    assert fsdp["FSDP gather buffers"] > 0 and ddp["FSDP gather buffers"] == 0


def test_plan_command_prints_both_layouts(capsys):
    assert main(["plan", "--recipe", "recipes/dit.yaml", "--num-processes", "8", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "facebook/DiT-XL-2-256, 8 processes" in out and "fits 80 GB" in out and "ddp" in out and "fsdp" in out
    capsys.readouterr()
    assert main(["plan", "--teacher", "someone/unknown", "--num-processes", "2"]) == 1
    assert "there is no published config of teacher 'someone/unknown'" in capsys.readouterr().err
