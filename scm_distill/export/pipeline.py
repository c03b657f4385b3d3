"""Export a trained student as a diffusers pipeline folder (atomic: temporary folder, then rename)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import atomic_directory
from ..families.base import ExportInfo, Teacher


def export_pipeline(teacher: Teacher, network: torch.nn.Module, folder: Path, info: ExportInfo,
                    overwrite: bool = True) -> Path:  # fmt: skip
    """Write the student's pipeline into `folder`; a failure leaves no half-written folder behind."""
    with atomic_directory(Path(folder), overwrite=overwrite) as tmp:
        teacher.export(network, tmp, info)
    return Path(folder)
