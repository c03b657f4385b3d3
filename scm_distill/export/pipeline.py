"""Write a trained student as a diffusers pipeline folder: one writer for every family.

The folder is the student's pipeline (`Teacher.student_pipeline` on the export network) saved by diffusers, plus the
description (`scm_distill.json`), the model card, the LoRA adapters for the original teacher (LoRA runs, in
`lora/`), and nothing that names a local path. It is written to a temporary folder and renamed, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..checkpoint import atomic_directory
from ..families.base import ExportInfo, Teacher
from ..loading import quiet_loading
from ..lora import has_lora, save_lora
from .card import write_model_card
from .contract import LORA_FOLDER, write_description


def strip_local_paths(folder: Path) -> None:
    """Drop `_name_or_path` (where diffusers records the folder a model was loaded from) from every JSON config."""
    for path in Path(folder).rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            data.pop("_name_or_path")
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_pipeline(teacher: Teacher, network: torch.nn.Module, folder: Path, info: ExportInfo,
                    overwrite: bool = True) -> Path:  # fmt: skip
    """Write the student's pipeline into `folder`; a failure leaves no half-written folder behind."""
    pipe = teacher.student_pipeline(teacher.export_network(network), info)
    description = dataclasses.replace(teacher.describe(pipe, info), requested_times=(info.t_max, info.t_mid))
    adapters = teacher.lora_adapters(network) if has_lora(network) else None
    if adapters is not None:
        description = dataclasses.replace(description, lora=LORA_FOLDER)
    with atomic_directory(Path(folder), overwrite=overwrite) as tmp:
        with quiet_loading():
            pipe.save_pretrained(tmp, safe_serialization=True)
        if adapters is not None:
            pipeline_class, component = adapters
            save_lora(network, tmp / LORA_FOLDER, pipeline_class, component)
        strip_local_paths(tmp)
        write_description(tmp, description)
        write_model_card(tmp, description, info.sample_grid)
    return Path(folder)

