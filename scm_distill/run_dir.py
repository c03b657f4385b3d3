"""The run directory: what is in it, whether an output folder may be used, and what --overwrite may remove.

Layout: run.json (marker), config.json (resolved config), log.jsonl, loss.png, logs/ (tracker files),
checkpoints/step-NNNNNNN/ and checkpoints/best/, samples/*.png, pipeline/ (the export), .scm-distill.lock while a
process trains in it. `check_output` decides, before anything is written, what the folder allows; `start_run_dir`
then creates it. `--overwrite` removes only the entries a previous run created (the layout's names and our temporary
names), never other files, and refuses a folder that is not a previous run or that holds the run's own data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import DistillConfig, to_dict
from .errors import UserError
from .files import (
    TEMPORARY_NAME,
    check_writable_folder,
    os_error_sentence,
    remove_stale_temporaries,
    remove_tree,
    write_atomic,
)
from .run_lock import LOCK_NAME

RUN_MARKER = "run.json"


@dataclass(frozen=True)
class Layout:
    """What a tool writes into its output folder."""

    marker: str  # file that says the folder is this tool's previous output
    entries: frozenset[str]  # top-level names it creates: the only ones --overwrite removes


RUN_LAYOUT = Layout(RUN_MARKER, frozenset({RUN_MARKER, "config.json", "log.jsonl", "checkpoints", "samples",
                                           "pipeline", "logs", "loss.png", LOCK_NAME}))  # fmt: skip


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def is_ours(path: Path, layout: Layout) -> bool:
    return (Path(path) / layout.marker).is_file()


def user_entries(out: Path) -> list[Path]:
    """What a folder holds besides a lock and our temporaries (a folder with only those counts as empty)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name != LOCK_NAME and not TEMPORARY_NAME.match(p.name)]


def inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def run_inputs(config: DistillConfig) -> list[tuple[str, Path]]:
    """Local paths the run reads: the --data folder and the latent cache (built-in and hf: data are not paths)."""
    found = []
    spec = Path(config.data.spec).expanduser()
    if not config.data.spec.startswith("hf:") and spec.exists():
        found.append(("--data", spec))
    if config.data.latent_cache:
        found.append(("data.latent_cache", Path(config.data.latent_cache).expanduser()))
    return found


def check_output(config: DistillConfig, resume: str | None, overwrite: bool, layout: Layout = RUN_LAYOUT) -> None:
    """Decide what the output folder allows, before anything is written (one sentence when it does not)."""
    out = Path(config.output)
    check_writable_folder(out, "output")
    if resume:
        if overwrite:
            raise UserError("--resume continues a run and --overwrite starts it over; pass only one of them.")
        if not is_run_dir(out):
            raise UserError(f"output '{out}' does not hold a previous run to resume.")
        return
    if not user_entries(out):
        return
    if not is_ours(out, layout):
        what = "a previous run" if layout is RUN_LAYOUT else f"a previous output of this command (no {layout.marker})"
        raise UserError(f"output folder '{out}' holds files that are not {what}; --overwrite only replaces a "
                        f"previous output, so choose another --output or empty the folder yourself.")  # fmt: skip
    if not overwrite:
        raise UserError(f"output '{out}' holds a previous run; pass --resume latest to continue it or --overwrite to "
                        f"start over.")  # fmt: skip
    for what, path in run_inputs(config):
        if inside(path, out):
            raise UserError(f"--overwrite would clear output '{out}', which holds the run's {what} '{path}'; move "
                            f"it out of the output folder or choose another --output.")  # fmt: skip


def clear_previous_output(out: Path, layout: Layout) -> list[str]:
    """Remove the entries a previous run created (layout names and our temporaries, not the lock); returns them."""
    removed = []
    for entry in sorted(out.iterdir()):
        if entry.name == LOCK_NAME or not (entry.name in layout.entries or TEMPORARY_NAME.match(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(os_error_sentence(error, out)) from None


def clean_stale_temporaries(out: Path) -> None:
    """Temporary folders and files of killed runs (our naming pattern only, only inside the run folder)."""
    for folder in (out, out / "checkpoints", out / "samples"):
        remove_stale_temporaries(folder)


def start_run_dir(config: DistillConfig, resuming: bool, overwrite: bool, layout: Layout = RUN_LAYOUT) -> Path:
    """Clear a previous run (with --overwrite) and write run.json (+ the layout's marker) and config.json; the
    folder exists and is locked by the caller."""
    out = Path(config.output)
    clean_stale_temporaries(out)
    if overwrite and not resuming:
        clear_previous_output(out, layout)
    marker = json.dumps({"scm_distill": __version__, "created": time.time()}) + "\n"
    try:
        for name in {RUN_MARKER, layout.marker} if not resuming else ():
            write_atomic(out / name, marker)
        write_atomic(out / "config.json", json.dumps(to_dict(config), indent=2) + "\n")
    except OSError as error:
        raise UserError(os_error_sentence(error, out)) from None
    return out
