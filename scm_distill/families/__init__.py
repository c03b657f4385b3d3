"""Teacher families and `load_teacher`: a path or Hub id -> the adapter of its family.

Adding a family = one module with a `Teacher` subclass, registered in FAMILIES. Before a family loads anything,
`load_teacher` refuses a folder that ships Python code (unless trusted), a component without its folder, and
weight files whose safetensors headers are damaged or truncated, each with one sentence.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import MissingFileError, UserError
from ..export.load import check_trusted
from ..fingerprint import safetensors_header
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


def resolve_folder(source: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local pipeline folder, or a Hub id (at `revision`) found in the local cache (`cache_dir`, default the
    Hub's) or downloaded."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"teacher '{source}' is a file, not a pipeline folder.")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise MissingFileError(f"teacher '{source}' does not exist (not a local folder and not a Hub id "
                               f"'owner/name').")  # fmt: skip
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network next
        pass
    try:
        return Path(snapshot_download(source, revision=revision, cache_dir=cache_dir))
    except Exception as error:  # noqa: BLE001 - any hub/network failure is one message
        raise UserError(f"teacher '{source}' is not a local folder and could not be fetched from the Hugging "
                         f"Face Hub ({error.__class__.__name__}; offline?).") from None  # fmt: skip


def family_of(model_index: dict, source: str) -> type[Teacher]:
    matching = [family for family in FAMILIES if family.matches(model_index)]
    if len(matching) > 1:
        names = [f.family for f in matching]
        raise RuntimeError(f"families {names} all match '{source}'; `matches` must be exclusive.")
    if matching:
        return matching[0]
    name = model_index.get("_class_name", "?")
    raise UserError(f"teacher '{source}' is a {name} pipeline, a family not supported yet; supported: "
                     f"{supported_families()}.")  # fmt: skip


def check_components(folder: Path, model_index: dict, source: str) -> None:
    """Every component model_index.json names has its folder, and every weight file a complete header."""
    for name, entry in model_index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[1]):
            continue
        if not (folder / name).is_dir():
            raise UserError(f"teacher '{source}' names a '{name}' component in model_index.json but has no "
                            f"'{name}/' folder.")  # fmt: skip
        for weights in sorted((folder / name).glob("*.safetensors")):
            safetensors_header(weights)


# what diffusers / safetensors raise on damaged files not checked beforehand (diffusers wraps bad JSON in OSError)
LOAD_ERRORS = (OSError, SafetensorError)


def load_teacher(source: str, sigma_d: float = 0.5, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, revision: str | None = None,
                 variant: str | None = None, cache_dir: str | None = None) -> Teacher:  # fmt: skip
    """Load a teacher pipeline and wrap it in its family's adapter; a folder that ships Python code is refused
    unless `trust_remote_code` (no family runs such code, but the folder's author meant it to be run). Hub
    teachers: `revision` (branch, tag or commit), `cache_dir`; any teacher: the weight `variant` (e.g. fp16)."""
    folder = resolve_folder(source, revision, cache_dir)
    model_index = read_model_index(folder)
    check_trusted(folder, model_index, trust_remote_code, what="teacher")
    family = family_of(model_index, source)
    check_components(folder, model_index, source)
    try:
        options = {"variant": variant} if variant else {}
        return family.from_pretrained(folder, source, sigma_d, torch.device(device), dtype, **options)
    except UserError:
        raise
    except LOAD_ERRORS as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"teacher '{source}' could not be loaded; a config or weight file is damaged or does not "
                        f"match ({error.__class__.__name__}: {reason}).") from None  # fmt: skip


__all__ = ["FAMILIES", "ExportInfo", "Teacher", "load_teacher", "supported_families"]
