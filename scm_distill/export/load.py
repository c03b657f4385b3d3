"""Load a pipeline folder the way a user would (plain diffusers), and never run code the user did not trust.

A folder ships Python code when its model_index.json names a pipeline file (`"_class_name": [file, class]`) or a
component whose library is a file in the folder or no installed package (diffusers imports those files on load).
Loading such a folder needs `trust_remote_code=True` (Python) / `--trust-remote-code` (CLI), for exports and
teachers alike; our own exports that need it say so in their model card.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import UserError


class UntrustedCodeError(UserError):
    """A folder ships Python code and trust_remote_code was not given."""


def export_index(folder: str | Path) -> dict:
    """The model_index.json of a pipeline folder (one-sentence error when there is none or it is not JSON)."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError(f"'{folder}' is not an exported pipeline folder (no model_index.json).")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON.") from None
    if not isinstance(index, dict):
        raise UserError(f"'{path}' is not a JSON object of pipeline components.")
    return index


def is_installed_package(library: str) -> bool:
    try:
        return importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):  # e.g. "a..b" or a parent package that is not installed
        return False


def shipped_code(folder: str | Path, index: dict) -> list[str]:
    """The code files loading this pipeline would import: its own pipeline file and any custom components."""
    folder = Path(folder)
    code = []
    if isinstance(index.get("_class_name"), list):
        code.append(f"{index['_class_name'][0]}.py")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            continue
        library = entry[0]
        ships = (folder / name / f"{library}.py").is_file() or (folder / f"{library}.py").is_file()
        if ships or not is_installed_package(library):
            code.append(f"{name}/{library}.py")
    return code


def check_trusted(folder: str | Path, index: dict, trust_remote_code: bool, what: str = "pipeline") -> bool:
    """Refuse a folder that ships code unless trusted; returns whether diffusers must be allowed to run it."""
    code = shipped_code(folder, index)
    if code and not trust_remote_code:
        raise UntrustedCodeError(f"{what} '{folder}' ships Python code ({code[0]}) that loading it would run; pass "
                                 f"--trust-remote-code (Python: trust_remote_code=True) if you trust its "
                                 f"author.")  # fmt: skip
    return bool(code)


def load_export(folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """`DiffusionPipeline.from_pretrained(folder)`; a folder that ships code loads only with trust_remote_code."""
    from diffusers import DiffusionPipeline

    from ..loading import quiet_loading

    runs_code = check_trusted(folder, export_index(folder), trust_remote_code)
    with quiet_loading():
        return DiffusionPipeline.from_pretrained(folder, trust_remote_code=runs_code, **kwargs)
