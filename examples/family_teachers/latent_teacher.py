"""Train one latent family's teacher on the shared VAE's cached latents, save its pipeline folder, check it.

The folder is what `save_pretrained` writes for the family's stock pipeline (plus DiT's id2label), with
`teacher_info.json` (data, sizes, steps, minutes, parameters, command) and, after the check, its FD and class
accuracy at the stock pipeline's default step count and `check_samples.png` (one row per class).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import diffusers
import torch

from scm_distill.data import batch_indices

from . import check
from .base import CFG_DROPOUT, LatentFamily, cfg_rows, rows
from .data import IMAGE_SIZE
from .training import machine, output_folder, refuse_existing, train, write_json
from .transformer_families import DiTFamily, FluxFamily, SanaFamily, SD3Family
from .unet_families import EDMFamily, SDFamily, SDXLFamily
from .vae import TrainedVAE, load_trained_vae

LATENT_FAMILIES: dict[str, type[LatentFamily]] = {f.name: f for f in (SDFamily, SDXLFamily, DiTFamily, SD3Family,
                                                                       FluxFamily, SanaFamily, EDMFamily)}  # fmt: skip
INFO_FILE, GRID_FILE = "teacher_info.json", "check_samples.png"
CHECK_BATCH = 100  # images per pipeline call in the check


def family_vae(trained: TrainedVAE, family: LatentFamily) -> torch.nn.Module:
    """The shared VAE's weights under the family's latent convention (config entries only)."""
    # without the private keys: from_config would reset the ones in `_use_default_values` to their defaults
    base = {k: v for k, v in trained.vae.config.items() if not k.startswith("_")}
    config = {**base, **family.latent_config(trained.info["latent_statistics"])}
    vae = type(trained.vae).from_config(config)
    vae.load_state_dict(trained.vae.state_dict())
    return vae.eval().requires_grad_(False)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_latent_teacher(name: str, size_name: str, out: Path, vae_dir: Path, seed: int,
                         train_overrides: dict, command: str, overwrite: bool) -> Path:  # fmt: skip
    """Train and save the teacher of family `name` (no check; see `check_teacher`)."""
    refuse_existing(out, overwrite)
    family = LATENT_FAMILIES[name]()
    size = family.sizes[size_name]
    size = dataclasses.replace(size, train=dataclasses.replace(size.train, **train_overrides))
    trained = load_trained_vae(vae_dir, family.vae_kind)
    vae = family_vae(trained, family)
    pipe = family.build_pipeline(vae, size, seed)
    table = family.condition_table(pipe)
    net = getattr(pipe, family.denoiser_name)
    family.prepare_for_training(net)
    x0, labels = family.to_latents(trained.latents, vae.config), trained.labels

    def batch(step: int) -> tuple:
        index = batch_indices(step, size.train.batch_size, len(x0), seed)
        drop = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return x0[index], rows(table, cfg_rows(labels[index], drop))

    def loss(model, data: tuple, generator: torch.Generator) -> torch.Tensor:
        return family.loss(model, data[0], data[1], generator)

    result = train(net, loss, batch, size.train, seed, name)
    pipe.register_modules(**{family.denoiser_name: result.ema.eval()})
    info = teacher_info(family, pipe, size, size_name, trained, result, len(x0), seed, command)
    with output_folder(out, overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        family.finish_folder(tmp, size)
        write_json(tmp / INFO_FILE, info)
    print(f"saved {out}: {info['parameters']['denoiser']:,} denoiser parameters, {info['train_minutes']} min "
          f"({info['train_cpu_minutes']} CPU min)")  # fmt: skip
    return out


def teacher_info(family: LatentFamily, pipe, size, size_name: str, trained: TrainedVAE, result, n: int, seed: int,
                 command: str) -> dict:  # fmt: skip
    encoders = {k: parameters(v) for k, v in pipe.components.items()
                if k.startswith("text_encoder") and v is not None}  # fmt: skip
    return {"family": family.name, "pipeline": type(pipe).__name__, "size": size_name,
            "data": f"fashion-mnist train split ({n} images), 28x28 padded to {IMAGE_SIZE}x{IMAGE_SIZE}, RGB",
            "latent_shape": list(trained.latents.shape[1:]), "vae": str(trained.folder),
            "vae_info": {k: trained.info.get(k) for k in ("kind", "parameters", "train_minutes", "cpu_minutes",
                                                          "reconstruction")},
            "denoiser": type(getattr(pipe, family.denoiser_name)).__name__,
            "model_config": size.model, "train": dataclasses.asdict(size.train), "cfg_dropout": CFG_DROPOUT,
            "scheduler": type(pipe.scheduler).__name__, "default_steps": family.default_steps,
            "parameters": {"denoiser": parameters(getattr(pipe, family.denoiser_name)), "vae": parameters(pipe.vae),
                           **encoders},
            "train_minutes": round(result.wall_minutes, 2), "train_cpu_minutes": round(result.cpu_minutes, 2),
            "final_loss": round(result.final_loss, 5), "seed": seed, "machine": machine(),
            "command": command}  # fmt: skip


def update_info(folder: Path, updates: dict, name: str = INFO_FILE) -> dict:
    """Merge `updates` into the folder's JSON file `name` (temporary file, fsync, rename)."""
    path = Path(folder) / name
    info = {**json.loads(path.read_text()), **updates}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_json(tmp, info)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return info


def check_teacher(folder: Path, n: int, guidance_scale: float | None, cache_dir: Path) -> dict:
    """Sample the saved folder with plain `DiffusionPipeline.from_pretrained` at the family's default steps, measure
    FD and class accuracy, and record them in teacher_info.json under "check"."""
    info = json.loads((Path(folder) / INFO_FILE).read_text())
    family = LATENT_FAMILIES[info["family"]]()
    scale = guidance_scale if guidance_scale is not None else family.sizes[info["size"]].guidance_scale
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    sampler = check.pipeline_sampler(pipe, lambda labels: family.call_inputs(labels, scale), family.default_steps)
    facts = {"sampler": f"{type(pipe).__name__} + {type(pipe.scheduler).__name__} (stock, from_pretrained)",
             "steps": family.default_steps, "guidance_scale": scale, "call": family.call_inputs([0], scale)}
    result = check.check(sampler, n, CHECK_BATCH, cache_dir, Path(folder) / GRID_FILE, facts)
    update_info(folder, {"check": result})
    print(f"{info['family']}: FD {result['fd']}, class accuracy {result['accuracy']} ({n} samples, "
          f"{family.default_steps} steps, guidance {scale})")  # fmt: skip
    return result



def toolkit_sampler(folder: Path, family: LatentFamily, scale: float, steps: int):
    """sample_fn of the teacher as `scm-distill evaluate --teacher` samples it: the toolkit's adapter
    (scm_distill.families.load_teacher) with its own DDIM sampler at `steps`, CFG at `scale`."""
    from scm_distill.families import load_teacher
    from scm_distill.generate import teacher_samples
    from scm_distill.grids import to_uint8

    from .data import CAPTIONS

    teacher = load_teacher(str(folder))
    teacher.default_scale = scale
    teacher.at_resolution((IMAGE_SIZE, IMAGE_SIZE))  # as evaluate does: FLUX and Sana default to 1024 px
    expected = (teacher.space.channels, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    if tuple(teacher.sample_shape) != expected:
        raise ValueError(f"load_teacher reads a sample shape {tuple(teacher.sample_shape)}, not the pipeline's "
                         f"{expected}")  # fmt: skip

    def sample(labels: list[int], seed: int) -> torch.Tensor:
        if family.name == "dit":
            inputs = {"class_labels": list(labels)}
        else:
            inputs = {"prompt": [CAPTIONS[label] for label in labels]}
        condition = teacher.condition_for(inputs)  # at teacher.default_scale = scale
        generator = torch.Generator().manual_seed(seed)
        x0 = teacher_samples(teacher.model, (len(labels), *teacher.sample_shape), steps, generator, condition)
        return to_uint8(teacher.decode(x0))

    return sample, teacher.family


def check_toolkit_reading(folder: Path, n: int, guidance_scale: float | None, cache_dir: Path) -> dict:
    """The same check through the toolkit's reading of the teacher (what evaluate and distill see), recorded under
    "check_toolkit"; a reading that fails is recorded with its error."""
    info = json.loads((Path(folder) / INFO_FILE).read_text())
    family = LATENT_FAMILIES[info["family"]]()
    scale = guidance_scale if guidance_scale is not None else family.sizes[info["size"]].guidance_scale
    try:
        sampler, adapter = toolkit_sampler(folder, family, scale, family.default_steps)
    except (ValueError, NotImplementedError) as error:
        result = {"error": str(error)}
    else:
        facts = {"sampler": f"scm_distill load_teacher ({adapter}) + generate.teacher_samples (DDIM)",
                 "steps": family.default_steps, "guidance_scale": scale}  # fmt: skip
        result = check.check(sampler, n, CHECK_BATCH, cache_dir, None, facts)
    update_info(folder, {"check_toolkit": result})
    print(f"{info['family']} through load_teacher: {result}")
    return result
