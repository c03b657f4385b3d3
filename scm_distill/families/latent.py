"""Latent-space teachers: the VAE's latents as the consistency model's data, their sigma_d, and a latent cache.

The data space is the one the teacher's pipeline samples in: x0 = (E(image) - shift) * scale, with E the VAE
encoder's posterior mean (or the latent of a deterministic autoencoder such as Sana's DC-AE; either way cacheable
and resume-exact), scale = `scaling_factor` (/ `latents_std`
where the VAE config has per-channel statistics) and shift = `shift_factor` or `latents_mean` (SD3/FLUX, some
SDXL VAEs); decoding inverts it. TrigFlow's sigma_d is measured on these latents (arXiv 2410.11081v2 sets 0.5 for
normalised pixels; latents have their own scale), as their root mean square: with z ~ N(0, sigma_d^2 I),
E|x_t|^2 = sigma_d^2 D at every t.

The optional on-disk cache is content-addressed: a latent is stored under the hash of its image (uint8 pixels
after transforms) inside a folder named by the hash of the VAE (config and weights), so the VAE runs once per
image for any data spec, order, subset or process, and a changed VAE or image never reads a stale latent. It is
filled as batches miss it; the values used in training are always the stored ones, so a resumed run reads exactly
what the interrupted one used.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..data import ImageSet
from ..data.imageset import evenly_spaced
from ..errors import UserError
from ..parameterization import freeze
from ..progress import tracked

ENCODE_BATCH = 16  # images per VAE call while filling the cache or measuring sigma_d


# sigma_d as the root mean square of the data (E|x_t|^2 = sigma_d^2 D at every t for z ~ N(0, sigma_d^2 I)).
def measure_sigma_data(latents: Tensor) -> Tensor:
    return latents.double().square().mean().sqrt()


class LatentSpace:
    """A frozen VAE and the affine map between its posterior mean and the teacher's latent space."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = freeze(vae)
        config = vae.config
        stats = config.get("latents_mean") is not None and config.get("latents_std") is not None
        channels = config.latent_channels
        shape = (1, channels, 1, 1)
        self.shift = torch.tensor(config.latents_mean).view(shape) if stats else config.get("shift_factor")
        self.scale = config.scaling_factor / torch.tensor(config.latents_std).view(shape) if stats else \
            config.scaling_factor  # fmt: skip

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsampling(self) -> int:
        """Pixels per latent along each side, 2^(levels - 1) (deep-compression autoencoders name their levels
        `encoder_block_out_channels`)."""
        config = self.vae.config
        levels = config.get("block_out_channels") or config.get("encoder_block_out_channels")
        return 2 ** (len(levels) - 1)

    def latent_size(self, resolution: tuple[int, int]) -> tuple[int, int]:
        return resolution[0] // self.downsampling, resolution[1] // self.downsampling

    def check_images(self, images: ImageSet, multiple: int = 8) -> None:
        """One-sentence error for images the VAE (and the pipeline, which wants sizes divisible by 8) cannot take."""
        channels, (h, w) = images.channels, images.resolution
        if channels != self.vae.config.in_channels:
            raise UserError(f"data '{images.name}' has {channels} channel(s) but the teacher's VAE encodes "
                             f"{self.vae.config.in_channels}-channel images.")  # fmt: skip
        step = max(multiple, self.downsampling)
        if h % step or w % step:
            raise UserError(f"data '{images.name}' is {h}x{w} but the teacher's VAE and pipeline need sizes "
                             f"divisible by {step}; set data.resize_to.")  # fmt: skip

    # x0 = (E(image) - shift) * scale: images [B, C, H, W] in [-1, 1] -> latents [B, c, H/f, W/f].
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        vae = self.vae
        out = vae.encode(images.to(vae.device, vae.dtype))
        # a KL autoencoder's posterior mean, or a deterministic autoencoder's latent (Sana's DC-AE)
        mean = (out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent).float()
        if self.shift is not None:
            mean = mean - _on(self.shift, mean)
        return mean * _on(self.scale, mean)

    # image = D(x0 / scale + shift), in [-1, 1] (not clamped).
    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        z = x0 / _on(self.scale, x0)
        if self.shift is not None:
            z = z + _on(self.shift, z)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def fingerprint(self) -> str:
        """Hash of the VAE's config and weights (names the cache folder)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _on(value, like: Tensor):
    return value.to(like.device, like.dtype) if isinstance(value, Tensor) else value


# Content key of one image in [-1, 1] [C, H, W]: the hash of its uint8 pixels and shape.
def image_key(image: Tensor) -> str:
    pixels = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(pixels.shape)).encode())
    return digest.hexdigest()


class LatentCache:
    """Content-addressed latents on disk: ROOT/<vae hash>/<shard>.safetensors, each shard a [N, c, h, w] tensor
    with its image keys in the metadata. Shards are written atomically (temporary file, then rename)."""

    def __init__(self, root: str | Path, vae_fingerprint: str):
        self.folder = Path(root).expanduser() / vae_fingerprint
        self.index: dict[str, tuple[Path, int]] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    keys = json.loads(f.metadata()["keys"])
                self.index.update({key: (shard, row) for row, key in enumerate(keys)})

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def add(self, keys: list[str], latents: Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest()
        shard = self.folder / f"{name}.safetensors"
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp, metadata={"keys": json.dumps(keys)})
        os.replace(tmp, shard)
        self.index.update({key: (shard, row) for row, key in enumerate(keys)})

    def get(self, keys: list[str]) -> Tensor:
        """Latents of `keys` in order (each shard is opened once; safetensors reads only the rows asked for)."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self.index[key]
            by_shard.setdefault(shard, []).append((position, row))
        out: list[Tensor | None] = [None] * len(keys)
        for shard, wanted in by_shard.items():
            with safe_open(shard, "pt") as f:
                table = f.get_slice("latents")
                for position, row in wanted:
                    out[position] = table[row : row + 1]
        return torch.cat(out)


class LatentData:
    """Training latents: encoded per batch, or read from the cache, which each batch fills with what it misses
    (so the VAE runs once per image over all epochs and runs)."""

    def __init__(self, space: LatentSpace, cache_root: str | None = None):
        self.space = space
        self.cache = LatentCache(cache_root, space.fingerprint()) if cache_root is not None else None

    def sigma_data(self, images: ImageSet, n: int) -> float:
        """sigma_d measured on the latents of n evenly spaced images of the data set."""
        picked = evenly_spaced(len(images), n).tolist()
        starts = tracked(range(0, len(picked), ENCODE_BATCH), "encoding latents (sigma_d)", unit="batch")
        latents = [self.latents(torch.stack([images[i]["image"] for i in picked[s : s + ENCODE_BATCH]]))
                   for s in starts]  # fmt: skip
        return float(measure_sigma_data(torch.cat(latents)))

    def latents(self, images: Tensor) -> Tensor:
        """Latents of a batch of images [B, C, H, W] in [-1, 1], on the VAE's device."""
        if self.cache is None:
            return self.space.encode(images)
        keys = [image_key(image) for image in images]
        new = [i for i, key in enumerate(keys) if key not in self.cache]
        if new:
            self.cache.add([keys[i] for i in new], self.space.encode(images[new]))
        return self.cache.get(keys).to(self.space.vae.device)
