"""Checkpoints as safetensors + JSON (never pickles), written to a temporary folder, fsynced and renamed.

Layout of `checkpoints/step-000400/`: `student.safetensors` (network + logvar head), `ema.safetensors`,
`optimizer.safetensors` (per-parameter state tensors) and `state.json` (step, counters, optimizer scalars, the
run's fingerprint). Old checkpoints are pruned by renaming them to a hidden trash name first; resuming `latest`
falls back to the next older checkpoint when the newest cannot be read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import apply_umask, fsync_path, fsync_tree, remove_tree, temporary_sibling

FORMAT_VERSION = 1


class CorruptCheckpointError(UserError):
    """A checkpoint folder whose files are missing, truncated or unreadable."""


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success its files and itself are fsynced and it replaces `final` in one
    rename (then the parent folder is fsynced); on error it is removed."""
    final = Path(final)
    tmp = temporary_sibling(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        if final.exists():
            if not overwrite:
                raise UserError(f"'{final}' already exists.")
            old = temporary_sibling(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_path(final.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON scalars."""
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def optimizer_from_flat(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in scalars["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(directory: Path, student: dict, ema: dict, optimizer: dict, state: dict) -> Path:
    """Write one checkpoint atomically; `state` is JSON-serialisable (step, counters, ...)."""
    opt_tensors, opt_scalars = optimizer_to_flat(optimizer)
    with atomic_directory(directory, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in student.items()}, tmp / "student.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        payload = {"format_version": FORMAT_VERSION, "optimizer": opt_scalars, **state}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
    return directory


def load_checkpoint(directory: Path) -> tuple[dict, dict, dict, dict]:
    """Read a checkpoint; any missing or unreadable part is a one-sentence error."""
    directory = Path(directory)
    try:
        state = json.loads((directory / "state.json").read_text())
        student = load_file(directory / "student.safetensors")
        ema = load_file(directory / "ema.safetensors")
        opt_tensors = load_file(directory / "optimizer.safetensors")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as error:
        raise CorruptCheckpointError(f"checkpoint '{directory}' is missing or corrupted "
                                     f"({error.__class__.__name__}).") from None  # fmt: skip
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"checkpoint '{directory}' has an unknown format version.")
    try:
        optimizer = optimizer_from_flat(opt_tensors, state.pop("optimizer"))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"checkpoint '{directory}' has a damaged optimizer state.") from None
    return student, ema, optimizer, state


def load_newest_checkpoint(run_dir: Path) -> tuple[Path, tuple[dict, dict, dict, dict]]:
    """The newest checkpoint of a run that reads back, with its contents; a damaged newer one is skipped with a
    warning (it is left on disk; the next checkpoint the run writes prunes it)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"there is no checkpoint to resume in '{run_dir}'.")
    problems = []
    for path in reversed(checkpoints):
        try:
            contents = load_checkpoint(path)
        except CorruptCheckpointError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            warnings.warn(f"{problem} Resuming from the older '{path.name}' instead.", stacklevel=2)
        return path, contents
    raise UserError(f"{problems[0]} No older checkpoint of '{run_dir}' reads back either.")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints, each renamed to a hidden trash name first."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        remove_tree(old)


def check_state_dict(loaded: dict, expected: dict, what: str) -> None:
    """Weights import fails loudly: same keys, same shapes."""
    missing, unexpected = expected.keys() - loaded.keys(), loaded.keys() - expected.keys()
    if missing or unexpected:
        names = sorted(missing | unexpected)[:3]
        raise UserError(f"{what} does not match the model: {len(missing)} missing and {len(unexpected)} "
                         f"unexpected tensors (e.g. {names}).")  # fmt: skip
    for key, value in expected.items():
        if loaded[key].shape != value.shape:
            raise UserError(f"{what} does not match the model: '{key}' has shape {tuple(loaded[key].shape)}, "
                             f"expected {tuple(value.shape)}.")  # fmt: skip
