"""The shared autoencoders: an 8-channel AutoencoderKL (SD, SDXL, DiT, SD3, FLUX), a 4-channel one (EDM: the stock
StableDiffusionXLPipeline reads per-channel latents_mean / latents_std as 4 channels, SDXL's latent width) and an
AutoencoderDC (Sana), each trained once on the teachers' data and cached in its folder with the latents of every
training image.

Folder layout: `vae/` (save_pretrained), `latents.safetensors` (raw encoder outputs of the train split in its order:
the posterior mean for KL, the latent for DC; [N, c, h, w]) and `vae_info.json` (kind, size, training, latent
statistics, reconstruction FD). Families set their own latent convention from the statistics (families.py).
Loss: L1 reconstruction of a posterior sample (KL) or the latent (DC) + kl_weight x KL(q(z|x) || N(0, I)) per
latent element (KL only; small, as SD's VAEs, so latents stay near-deterministic but bounded).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL
from safetensors.torch import load_file, save_file

from scm_distill.data import batch_indices
from scm_distill.metrics.classifier import class_accuracy

from .data import IMAGE_SIZE, fashion_split, to_model_range
from .training import TrainSettings, machine, output_folder, refuse_existing, train, write_json

ENCODE_BATCH = 250  # images per encoder call when caching latents
INFO_FILE, LATENTS_FILE = "vae_info.json", "latents.safetensors"


@dataclass(frozen=True)
class VAESize:
    """An autoencoder of 3 levels (4x downsampling: 32x32 images -> 8x8 latents) and its training."""

    widths: tuple[int, ...] = (32, 64, 64)  # block_out_channels (KL) / encoder and decoder channels (DC)
    latent_channels: int = 8  # channels of the latent (4 lost the prints and checks: reconstruction FD 30.7)
    kl_weight: float = 1e-4  # weight of the per-element KL term (KL only)
    train: TrainSettings = TrainSettings(steps=3500, batch_size=32, lr=1e-3, ema_halflife_kimg=5.0)


VAE_SIZES = {
    "cpu": VAESize(),
    "toy": VAESize(widths=(8, 8, 8), latent_channels=4,
                   train=TrainSettings(steps=4, batch_size=8, lr=1e-3, log_every=2)),
}
KL4_CHANNELS = 4  # StableDiffusionXLPipeline.__call__ views vae.config.latents_mean as [1, 4, 1, 1]


def vae_size(kind: str, size_name: str) -> VAESize:
    """The size's autoencoder for `kind` (kl4: the size's with 4 latent channels)."""
    size = VAE_SIZES[size_name]
    return dataclasses.replace(size, latent_channels=KL4_CHANNELS) if kind == "kl4" else size


def autoencoder_class(kind: str) -> type:
    return AutoencoderDC if kind == "dc" else AutoencoderKL


def build_vae(kind: str, size: VAESize) -> torch.nn.Module:
    """A fresh AutoencoderKL ("kl", "kl4") or AutoencoderDC ("dc") for 3-channel 32x32 images."""
    levels = len(size.widths)
    if autoencoder_class(kind) is AutoencoderKL:
        return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=size.widths, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=size.latent_channels,
                             norm_num_groups=min(8, size.widths[0]), sample_size=IMAGE_SIZE)  # fmt: skip
    return AutoencoderDC(in_channels=3, latent_channels=size.latent_channels, attention_head_dim=8,
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=size.widths, decoder_block_out_channels=size.widths,
                         encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
                         encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels)  # fmt: skip


def encode_raw(vae: torch.nn.Module, x: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
    """Encoder output: KL posterior mean (or a sample when `sample` is given), DC latent."""
    out = vae.encode(x)
    if not hasattr(out, "latent_dist"):
        return out.latent
    dist = out.latent_dist
    return dist.mean if sample is None else dist.mean + dist.std * torch.randn(dist.mean.shape, generator=sample)


def vae_loss(kind: str, kl_weight: float):
    """Per-sample L1 reconstruction (+ kl_weight x mean per-element KL for KL autoencoders)."""

    def loss(vae, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = vae.encode(x)
        if kind == "dc":
            return (vae.decode(out.latent).sample - x).abs().flatten(1).mean(1)
        dist = out.latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        kl = 0.5 * (dist.mean.square() + dist.var - 1 - dist.logvar)
        return (vae.decode(z).sample - x).abs().flatten(1).mean(1) + kl_weight * kl.flatten(1).mean(1)

    return loss


@torch.no_grad()
def encode_all(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw latents [N, c, h, w] of uint8 images [N, 1, 32, 32] (RGB copies in [-1, 1])."""
    vae.eval()
    return torch.cat([encode_raw(vae, to_model_range(chunk, 3)) for chunk in images.split(ENCODE_BATCH)])


def latent_statistics(latents: torch.Tensor) -> dict:
    """Mean and standard deviation of the raw latents, overall and per channel."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"mean": float(latents.mean()), "std": float(latents.std()),
            "channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist()}  # fmt: skip


def train_vae(kind: str, size_name: str, out: Path, seed: int, max_items: int | None, overwrite: bool,
              command: str, train_overrides: dict | None = None) -> Path:  # fmt: skip
    """Train the `kind` autoencoder on the train split and write its folder (weights, latents, info);
    `train_overrides` replaces fields of the size's training settings (steps, batch_size, lr)."""
    refuse_existing(out, overwrite)
    size = vae_size(kind, size_name)
    size = dataclasses.replace(size, train=dataclasses.replace(size.train, **(train_overrides or {})))
    data = fashion_split("train", max_items)
    images = data.images  # uint8 [N, 1, 32, 32]
    torch.manual_seed(seed)
    vae = build_vae(kind, size).to(memory_format=torch.channels_last)

    def batch(step: int) -> torch.Tensor:
        index = batch_indices(step, size.train.batch_size, len(images), seed)
        return to_model_range(images[index], 3).contiguous(memory_format=torch.channels_last)

    result = train(vae, vae_loss(kind, size.kl_weight), batch, size.train, seed, f"vae-{kind}")
    vae = result.ema.to(memory_format=torch.contiguous_format).eval()
    latents = encode_all(vae, images)
    info = {"kind": kind, "size": size_name, "config": _jsonable(dataclasses.asdict(size)),
            "data": f"fashion-mnist train split ({len(images)} images), padded to 32x32, RGB",
            "parameters": sum(p.numel() for p in vae.parameters()), "latent_shape": list(latents.shape[1:]),
            "latent_statistics": latent_statistics(latents), "final_loss": result.final_loss,
            "train_minutes": round(result.wall_minutes, 2), "cpu_minutes": round(result.cpu_minutes, 2),
            "seed": seed, "machine": machine(), "command": command}  # fmt: skip
    with output_folder(out, overwrite) as tmp:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_file({"latents": latents.contiguous(), "labels": data.labels.contiguous()}, tmp / LATENTS_FILE)
        write_json(tmp / INFO_FILE, info)
    print(f"saved {out} ({info['parameters']} parameters, {info['train_minutes']} min)")
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


@dataclass
class TrainedVAE:
    """A cached autoencoder folder, loaded."""

    folder: Path
    vae: torch.nn.Module  # eval mode, frozen
    latents: torch.Tensor  # raw latents of the train split [N, c, h, w]
    labels: torch.Tensor  # their labels [N]
    info: dict


def load_trained_vae(folder: Path, kind: str) -> TrainedVAE:
    """The VAE folder written by `train_vae`; one-sentence exit when it is missing or of the other kind."""
    info_path = Path(folder) / INFO_FILE
    if not info_path.is_file():
        raise SystemExit(f"error: '{folder}' is not a VAE folder of this script (no {INFO_FILE}).")
    info = json.loads(info_path.read_text())
    if info["kind"] != kind:
        raise SystemExit(f"error: '{folder}' holds a VAE of kind {info['kind']} but this family needs kind {kind} "
                         f"(train one with --family vae-{kind}).")  # fmt: skip
    vae = autoencoder_class(kind).from_pretrained(Path(folder) / "vae").eval().requires_grad_(False)
    tensors = load_file(Path(folder) / LATENTS_FILE)
    return TrainedVAE(Path(folder), vae, tensors["latents"], tensors["labels"], info)


@torch.no_grad()
def check_vae(folder: Path, n: int, cache_dir: Path) -> dict:
    """The floor of every latent teacher: FD and class accuracy of n reconstructed test images (evenly spaced,
    posterior mean / latent), recorded in vae_info.json under "reconstruction"."""
    from .check import frechet_distance
    from .latent_teacher import update_info

    info = json.loads((Path(folder) / INFO_FILE).read_text())
    vae = load_trained_vae(folder, info["kind"]).vae
    test = fashion_split("test", max_items=n)
    chunks = test.images.split(ENCODE_BATCH)
    decoded = [vae.decode(encode_raw(vae, to_model_range(chunk, 3))).sample for chunk in chunks]
    images = ((torch.cat(decoded).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    result = {"num_samples": len(images), "fd": round(frechet_distance(images, cache_dir), 3),
              "accuracy": round(class_accuracy(images, test.labels), 4),
              "feature_extractor": "efficientnet-lite0", "reference": "fashion-mnist test split (10,000), pad 32"}
    update_info(folder, {"reconstruction": result}, INFO_FILE)
    print(f"vae-{info['kind']}: reconstruction FD {result['fd']}, class accuracy {result['accuracy']} ({n} images)")
    return result
