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
    """True when model_index.json names code shipped in the folder (a pipeline or component file)."""
    index = export_index(folder)
    components = [v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    return isinstance(index.get("_class_name"), list) or any(v[0] not in ("diffusers", "transformers", None)
                                                              for v in components)


def load_export(folder: str | Path, trust_remote_code: bool | None = None, **kwargs):
    from diffusers import DiffusionPipeline

    from ..loading import quiet_loading

    trust = uses_own_pipeline_file(folder) if trust_remote_code is None else trust_remote_code
    with quiet_loading():
        return DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust, **kwargs)
