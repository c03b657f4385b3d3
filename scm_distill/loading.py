"""Loading diffusers pipelines quietly and refusing weights the CPU cannot train (shared by teachers and exports)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off (the CLI prints one line)."""
    from diffusers.utils import logging as diffusers_logging

    modules = [diffusers_logging]
    if importlib.util.find_spec("transformers") is not None:
        import transformers.utils.logging as transformers_logging

        modules.append(transformers_logging)
    modules = [m for m in modules if m.is_progress_bar_enabled()]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in modules:
            module.enable_progress_bar()


def half_precision_only(component_folder: Path) -> str | None:
    """'fp16' when a component folder holds only fp16-variant weights, 'half' when its only weights are stored in
    16 bits, else None."""
    if not component_folder.is_dir():
        return None
    files = [f for f in component_folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    full = [f for f in files if len(f.name.split(".")) == 2]
    if not full:
        return "fp16" if any(".fp16." in f.name for f in files) else None
    tensors = [f for f in full if f.suffix == ".safetensors"]
    if len(tensors) == len(full):
        with safe_open(tensors[0], "pt") as f:
            first = next(iter(f.keys()), None)
            if first is not None and f.get_slice(first).get_dtype() in ("F16", "BF16"):
                return "half"
    return None


def check_trainable_weights(folder: Path, component: str, source: str, device: torch.device) -> str | None:
    """One-sentence error for 16-bit-only weights on the CPU (the toolkit trains in float32 there); returns the
    variant to load ('fp16' or None)."""
    half = half_precision_only(Path(folder) / component)
    if half and device.type == "cpu":
        raise UserError(f"teacher '{source}' has only 16-bit {component} weights, which are meant for GPUs (on the "
                         f"CPU the toolkit trains in float32); run on a GPU or give float32 weights.")  # fmt: skip
    return "fp16" if half == "fp16" else None


def require_transformers(source: str, pipeline_name: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise UserError(f"teacher '{source}' is a {pipeline_name}, which needs transformers: "
                         f"pip install 'scm-distill[text]'.")  # fmt: skip
