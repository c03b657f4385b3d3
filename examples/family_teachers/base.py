"""What every latent family gives the training script: a pipeline of its own diffusers classes, a condition table,
its native loss, its latent convention, and its stock call.

Conditions are precomputed once through the pipeline's own `encode_prompt` (or, for DiT, the label ids), so
training sees exactly the tensors the stock pipeline computes at sampling time: a table of 11 rows per input, rows
0..9 the classes' captions (labels) and row 10 CFG's unconditional branch (the empty / negative prompt, SDXL's
zeros, DiT's null class 1000). A training batch reads rows `labels`, with a fraction `cfg_dropout` replaced by
row 10 (CFG dropout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .data import CAPTIONS
from .training import TrainSettings

NULL_ROW = len(CAPTIONS)  # row of the unconditional branch in a condition table
CFG_DROPOUT = 0.1  # fraction of training samples on the unconditional branch (SD, SDXL, DiT, SD3, FLUX, Sana)

Table = dict[str, Tensor]  # input name -> [11, ...]


@dataclass(frozen=True)
class FamilySize:
    """The denoiser's config and its training, for one size preset."""

    model: dict  # keyword arguments of the denoiser's diffusers class beyond the ones the family fixes
    train: TrainSettings  # optimisation
    guidance_scale: float  # CFG scale of the teacher check (the stock call)
    extra: dict = field(default_factory=dict)  # family-specific settings (documented where read)


def rows(table: Table, index: Tensor) -> dict[str, Tensor]:
    """The inputs of the rows `index` [B] of a condition table."""
    return {name: value[index] for name, value in table.items()}


def cfg_rows(labels: Tensor, generator: torch.Generator, dropout: float = CFG_DROPOUT) -> Tensor:
    """Table rows of a batch: the labels, a random `dropout` fraction replaced by the unconditional row."""
    drop = torch.rand(labels.shape, generator=generator) < dropout
    return torch.where(drop, torch.full_like(labels, NULL_ROW), labels)


class LatentFamily(ABC):
    """One diffusers family trained on the shared VAE's latents."""

    name: ClassVar[str]
    vae_kind: ClassVar[str] = "kl"  # "kl" / "kl4" (AutoencoderKL, 8 / 4 channels: vae.vae_size), "dc"
    default_steps: ClassVar[int]  # the stock pipeline's num_inference_steps default
    denoiser_name: ClassVar[str] = "transformer"  # the pipeline component that is trained
    sizes: ClassVar[dict[str, FamilySize]]

    @abstractmethod
    def latent_config(self, stats: dict) -> dict:
        """VAE config entries (scaling_factor, shift_factor, latents_mean/std) the family's pipeline reads."""

    @abstractmethod
    def build_pipeline(self, vae: torch.nn.Module, size: FamilySize, seed: int):
        """The family's stock pipeline: a fresh denoiser, frozen encoders, the family's scheduler config."""

    @abstractmethod
    def condition_table(self, pipe) -> Table:
        """The 11-row condition table, computed as the stock pipeline computes its inputs."""

    @abstractmethod
    def loss(self, net: torch.nn.Module, x0: Tensor, condition: dict, generator: torch.Generator) -> Tensor:
        """The native training loss per sample [B] at x0 [B, c, h, w] (the family's latent convention)."""

    @abstractmethod
    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        """Stock-pipeline keyword arguments generating one image per label (prompt or class_labels, CFG)."""

    def prepare_for_training(self, net: torch.nn.Module) -> None:
        """Hook before training (e.g. turning off a model's own label dropout, done by the table here)."""
        return None

    def finish_folder(self, folder, size: FamilySize) -> None:
        """Hook after save_pretrained (e.g. DiT's id2label in model_index.json)."""
        return None

    def to_latents(self, raw: Tensor, vae_config) -> Tensor:
        """Raw encoder outputs -> the pipeline's latent space, x0 = (raw - shift) * scale (per-channel statistics:
        scale = scaling_factor / latents_std, shift = latents_mean, as SDXL's pipeline decodes them)."""
        if vae_config.get("latents_mean") is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(vae_config["latents_mean"]).view(shape)
            return (raw - mean) * vae_config["scaling_factor"] / torch.tensor(vae_config["latents_std"]).view(shape)
        shift = vae_config.get("shift_factor") or 0.0
        return (raw - shift) * vae_config["scaling_factor"]


def scale_only(stats: dict) -> dict:
    """SD / SDXL / DiT / Sana convention: latents scaled to unit variance (SD's 0.18215 is 1 / std of its VAE)."""
    return {"scaling_factor": 1.0 / stats["std"]}


def shift_and_scale(stats: dict) -> dict:
    """SD3 / FLUX convention: shift_factor = mean, scaling_factor = 1 / std."""
    return {"shift_factor": stats["mean"], "scaling_factor": 1.0 / stats["std"]}


def channel_statistics(stats: dict, scaling_factor: float = 0.5) -> dict:
    """Playground v2.5 convention: per-channel latents_mean / latents_std and scaling_factor 0.5 (latent std 0.5,
    EDM's sigma_data)."""
    return {"latents_mean": stats["channel_mean"], "latents_std": stats["channel_std"],
            "scaling_factor": scaling_factor}  # fmt: skip
