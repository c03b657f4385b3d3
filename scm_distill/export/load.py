"""Load an exported pipeline the way a user would: plain diffusers, remote code only where the folder has it."""

from __future__ import annotations

import json
from pathlib import Path


def uses_own_pipeline_file(folder: Path) -> bool:
    """True when model_index.json names a pipeline file shipped in the folder (needs trust_remote_code)."""
    return isinstance(json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name"), list)


def load_export(folder: str | Path, **kwargs):
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"'{folder}' is not an exported pipeline folder (no model_index.json).")
    return DiffusionPipeline.from_pretrained(folder, trust_remote_code=uses_own_pipeline_file(folder), **kwargs)
