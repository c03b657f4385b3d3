"""Teacher families and `load_teacher`: a path or Hub id -> the adapter of its family.

Adding a family = one module with a `Teacher` subclass, registered in FAMILIES.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ExportInfo, Teacher, read_model_index
from .dit import DiTTeacher
from .edm import EDMStableDiffusionXLTeacher
from .flux import FluxTeacher
from .sana import SanaTeacher
from .sd import StableDiffusionTeacher, StableDiffusionXLTeacher
from .sd3 import StableDiffusion3Teacher
from .unet2d import UNet2DTeacher

# every pipeline matches at most one family (the EDM family takes SDXL pipelines with an EDM scheduler, sdxl the rest)
FAMILIES: tuple[type[Teacher], ...] = (UNet2DTeacher, StableDiffusionTeacher, EDMStableDiffusionXLTeacher,
                                       StableDiffusionXLTeacher, DiTTeacher, StableDiffusion3Teacher, FluxTeacher,
                                       SanaTeacher)  # fmt: skip


def supported_families() -> str:
    return "; ".join(f"{f.family} ({f.description})" for f in FAMILIES)


def resolve_folder(source: str) -> Path:
    """A local pipeline folder, or a Hub id found in the local cache or downloaded."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"teacher '{source}' is a file, not a pipeline folder.")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"teacher '{source}' does not exist (not a local folder and not a Hub id 'owner/name').")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network next
        pass
    try:
        return Path(snapshot_download(source))
    except Exception as error:  # noqa: BLE001 - any hub/network failure is one message
        raise ValueError(f"teacher '{source}' is not a local folder and could not be fetched from the Hugging "
                         f"Face Hub ({error.__class__.__name__}; offline?).") from None  # fmt: skip


def family_of(model_index: dict, source: str) -> type[Teacher]:
    matching = [family for family in FAMILIES if family.matches(model_index)]
    if len(matching) > 1:
        names = [f.family for f in matching]
        raise RuntimeError(f"families {names} all match '{source}'; `matches` must be exclusive.")
    if matching:
        return matching[0]
    name = model_index.get("_class_name", "?")
    raise ValueError(f"teacher '{source}' is a {name} pipeline, a family not supported yet; supported: "
                     f"{supported_families()}.")  # fmt: skip


def load_teacher(source: str, sigma_d: float = 0.5, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Teacher:  # fmt: skip
    """Load a teacher pipeline and wrap it in its family's adapter."""
    folder = resolve_folder(source)
    family = family_of(read_model_index(folder), source)
    return family.from_pretrained(folder, source, sigma_d, torch.device(device), dtype)


__all__ = ["FAMILIES", "ExportInfo", "Teacher", "load_teacher", "supported_families"]
