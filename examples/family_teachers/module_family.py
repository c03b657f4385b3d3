"""The `module` row: a teacher that is not a diffusers model (module_net.PixelUNet), trained, saved and loaded.

Training: DDPM L_simple (eps) on a 1000-step cosine VP schedule (diffusers' squaredcos_cap_v2 betas), images in
the network's own range [-0.5, 0.5], its own time input t = i / 1000, 10% label dropout to its null class.
Folder: `module.safetensors` (weights), `module.json` (what a user must state: prediction, schedule, time input,
data range, sample shape, conditioning, default sampler), `module_net.py` (the source, copied), teacher_info.json.
Sampling ("its own pipeline"): DDIM with a stock diffusers DDIMScheduler on the same betas, 100 steps, CFG.

`load_module_teacher` builds the public `ModuleTeacher` from the JSON with what a user states (prediction,
schedule, time input, data range) - no call hook.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from scm_distill.data import batch_indices
from scm_distill.student import TimeFeatures

from . import check
from . import objectives as obj
from .base import cfg_rows
from .data import IMAGE_SIZE, fashion_split, to_model_range
from .latent_teacher import GRID_FILE, INFO_FILE, update_info
from .training import TrainSettings, machine, output_folder, refuse_existing, train, write_json

SOURCE = Path(__file__).resolve().parent / "module_net.py"
WEIGHTS, DESCRIPTION = "module.safetensors", "module.json"
T = 1000  # training timesteps
BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule (Nichol & Dhariwal 2021) as diffusers names it
DATA_RANGE = (-0.5, 0.5)  # the network's image range
NUM_CLASSES = 10


@dataclass(frozen=True)
class ModuleSize:
    """The network's width and its training."""

    config: dict  # PixelUNet keyword arguments
    train: TrainSettings  # optimisation
    guidance_scale: float  # CFG scale of the default sampler (and the check)
    sample_steps: int = 100  # DDIM steps of the default sampler


MODULE_SIZES = {
    "cpu": ModuleSize(config={"width": 48, "emb": 128}, train=TrainSettings(steps=6000, batch_size=32, lr=1e-3),
                      guidance_scale=2.0),
    "toy": ModuleSize(config={"width": 8, "emb": 16}, train=TrainSettings(steps=3, batch_size=4, lr=1e-3, log_every=1),
                      guidance_scale=2.0, sample_steps=2),
}  # fmt: skip


def import_source(path: Path):
    """The module of a network source file (module_net.py), imported from its path."""
    spec = importlib.util.spec_from_file_location(f"scm_module_net_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alphas_cumprod() -> Tensor:
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=BETA_SCHEDULE).alphas_cumprod


def module_loss(ac: Tensor):
    """DDPM L_simple with the network's own time input t = tau / T and its own data range."""

    def loss(net, batch: tuple, generator: torch.Generator) -> Tensor:
        x0, labels = batch
        tau = torch.randint(0, T, (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        return obj.per_sample_mse(net(obj.vp_noised(x0, eps, ac[tau]), tau / T, labels), eps)

    return loss


def description(size: ModuleSize) -> dict:
    """module.json: everything the network's user has to state about it."""
    return {"class": "PixelUNet", "source": SOURCE.name, "weights": WEIGHTS, "config": size.config,
            "prediction": "epsilon",
            "schedule": {"type": "variance-preserving, discrete", "beta_schedule": BETA_SCHEDULE,
                         "num_train_timesteps": T, "alphas_cumprod": alphas_cumprod().tolist()},
            "time_input": "t = timestep / 1000, in [0, 1) (timestep: index into alphas_cumprod)",
            "data_range": list(DATA_RANGE), "sample_shape": [1, IMAGE_SIZE, IMAGE_SIZE],
            "conditioning": {"class_labels": f"0..{NUM_CLASSES - 1}, or None for unconditional",
                             "null_class": NUM_CLASSES, "label_dropout": 0.1},
            "default_sampler": {"scheduler": "DDIMScheduler", "beta_schedule": BETA_SCHEDULE,
                                "steps": size.sample_steps, "guidance_scale": size.guidance_scale}}  # fmt: skip


def train_module(size_name: str, out: Path, seed: int, overrides: dict, max_items: int | None, command: str,
                 overwrite: bool) -> Path:  # fmt: skip
    """Train the module teacher and write its folder."""
    refuse_existing(out, overwrite)
    size = MODULE_SIZES[size_name]
    size = dataclasses.replace(size, train=dataclasses.replace(size.train, **overrides))
    data = fashion_split("train", max_items)
    x0_all, labels = to_model_range(data.images, 1, *DATA_RANGE), data.labels
    torch.manual_seed(seed)
    net = import_source(SOURCE).PixelUNet(**size.config)

    def batch(step: int) -> tuple:
        index = batch_indices(step, size.train.batch_size, len(x0_all), seed)
        return x0_all[index], cfg_rows(labels[index], torch.Generator().manual_seed(seed * 1_000_003 + step))

    result = train(net, module_loss(alphas_cumprod()), batch, size.train, seed, "module")
    info = {"family": "module", "size": size_name, "network": "PixelUNet (module_net.py), not a diffusers model",
            "data": f"fashion-mnist train split ({len(x0_all)} images), 28x28 padded to 32x32, grey, in [-0.5, 0.5]",
            "config": size.config, "train": dataclasses.asdict(size.train), "cfg_dropout": 0.1,
            "default_steps": size.sample_steps, "parameters": {"denoiser": sum(p.numel() for p in net.parameters())},
            "train_minutes": round(result.wall_minutes, 2), "train_cpu_minutes": round(result.cpu_minutes, 2),
            "final_loss": round(result.final_loss, 5), "seed": seed, "machine": machine(),
            "command": command}  # fmt: skip
    with output_folder(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in result.ema.state_dict().items()}, tmp / WEIGHTS)
        write_json(tmp / DESCRIPTION, description(size))
        shutil.copyfile(SOURCE, tmp / SOURCE.name)
        write_json(tmp / INFO_FILE, info)
    print(f"saved {out}: {info['parameters']['denoiser']:,} parameters, {info['train_minutes']} min")
    return out


def load_module(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The network of a module folder (its own source file, strict weights load) and its description."""
    net, spec = fresh_network(folder)
    net.load_state_dict(load_file(Path(folder) / spec["weights"]))
    return net.eval().requires_grad_(False), spec


def fresh_network(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A new, untrained instance of a module folder's network class (its own source file) and its description:
    what a user passes to load_student."""
    spec = json.loads((Path(folder) / DESCRIPTION).read_text())
    return import_source(Path(folder) / spec["source"]).PixelUNet(**spec["config"]), spec


@torch.no_grad()
def ddim_samples(net, spec: dict, labels: list[int], seed: int, steps: int, guidance_scale: float) -> Tensor:
    """The module's default sampler: stock DDIMScheduler steps on the network's eps, CFG against its null class;
    uint8 [B, 1, 32, 32]."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=spec["schedule"]["beta_schedule"],
                                        clip_sample=False, set_alpha_to_one=False)  # fmt: skip
    scheduler.set_timesteps(steps)
    y = torch.tensor(labels)
    x = torch.randn((len(labels), *spec["sample_shape"]), generator=torch.Generator().manual_seed(seed))
    for tau in scheduler.timesteps:
        t = tau.float() / T
        eps_c, eps_u = net(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, NUM_CLASSES)])).chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), tau, x).prev_sample
    low, high = spec["data_range"]
    return ((x - low) / (high - low) * 255).round().clamp(0, 255).to(torch.uint8)


def check_module(folder: Path, n: int, guidance_scale: float | None, cache_dir: Path) -> dict:
    """FD and class accuracy of the module's default sampler, recorded in teacher_info.json."""
    net, spec = load_module(folder)
    sampler = spec["default_sampler"]
    scale = guidance_scale if guidance_scale is not None else sampler["guidance_scale"]
    steps = sampler["steps"]
    facts = {"sampler": "DDIMScheduler (stock) on the module's eps", "steps": steps, "guidance_scale": scale}
    result = check.check(lambda labels, seed: ddim_samples(net, spec, labels, seed, steps, scale), n, 100,
                         cache_dir, Path(folder) / GRID_FILE, facts)  # fmt: skip
    update_info(folder, {"check": result})
    print(f"module: FD {result['fd']}, class accuracy {result['accuracy']} ({n} samples, {steps} steps, "
          f"guidance {scale})")  # fmt: skip
    return result


def time_features(net) -> TimeFeatures:
    """Where PixelUNet embeds its time (module_net.timestep_features, read first by `time.0`): cos then sin of
    1000 t w_k, so column k and half + k turn at 1000 w_k rad per unit of its t."""
    half = net.label.embedding_dim // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    return TimeFeatures("time.0", (1000.0 * w).repeat(2))


def load_module_teacher(folder: Path, sigma_d: float | None = None):
    """The public ModuleTeacher (scm_distill.families.module) of a module folder, stating what its JSON says:
    eps, the alphas_cumprod schedule, time input t = i / T (time_scale 1 / T), data range [-0.5, 0.5] (sigma_d by
    default a quarter of its width), where the time features are (for the time-embedding low-pass), and its
    classes: labels 0..9 as `class_labels`, CFG against the null class at the default sampler's scale."""
    from scm_distill.families.module import ModuleTeacher

    net, spec = load_module(folder)
    ac = torch.tensor(spec["schedule"]["alphas_cumprod"], dtype=torch.float64)
    return ModuleTeacher(net, prediction=spec["prediction"], sample_shape=tuple(spec["sample_shape"]),
                         alphas_cumprod=ac, data_range=tuple(spec["data_range"]), sigma_d=sigma_d,
                         time_scale=1.0 / T, time_features=time_features(net), name=str(folder),
                         num_classes=NUM_CLASSES, null_class=spec["conditioning"]["null_class"],
                         guidance_scale=spec["default_sampler"]["guidance_scale"])  # fmt: skip
