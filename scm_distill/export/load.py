"""Load an exported pipeline the way a user would: plain diffusers, remote code only where the folder has it."""

from __future__ import annotations

import json
from pathlib import Path


def export_index(folder: str | Path) -> dict:
    """The model_index.json of a pipeline folder (one-sentence error when there is none)."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"'{folder}' is not an exported pipeline folder (no model_index.json).")
    return json.loads(path.read_text())


def uses_own_pipeline_file(folder: Path) -> bool:
    """True when model_index.json names a pipeline file shipped in the folder (needs trust_remote_code)."""
    return isinstance(export_index(folder).get("_class_name"), list)


def load_export(folder: str | Path, **kwargs):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, trust_remote_code=uses_own_pipeline_file(folder), **kwargs)
