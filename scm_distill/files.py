"""Writing files so that a crash or a full disk never leaves a half-written one, and output paths checked first.

A file is written under a temporary name in its own folder (`.NAME.tmp-XXXXXXXX`), fsynced, renamed over the
final name, and the folder fsynced, so after a power loss a reader finds the old file or the new one. Folders are
removed by first renaming them to a hidden trash name (`.NAME.trash-XXXXXXXX`), so no half-deleted folder is ever
visible under its real name. `check_writable_*` refuse, before any work starts, an output path under a file or in a
folder that cannot be written.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import UserError

# names of our temporary and trash entries: .NAME.tmp-XXXXXXXX, .NAME.old-XXXXXXXX, .NAME.trash-XXXXXXXX
TEMPORARY_NAME = re.compile(r"^\..+\.(tmp|old|trash)-[0-9a-f]{8}$")


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give every file and folder under `folder` (itself included) the modes a plain `open` / `mkdir` would under the
    user's umask (0o666 / 0o777 & ~umask): some writers (safetensors) create 0600 files, unreadable to teammates on
    shared storage."""
    mask = current_umask()
    for root, _, names in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder itself last."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write a file through a temporary sibling, fsync and rename; nothing is left behind on error."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)
    return path


def remove_tree(folder: Path) -> None:
    """Delete a folder after renaming it to a hidden trash name (atomic for readers)."""
    folder = Path(folder)
    trash = temporary_sibling(folder, "trash")
    os.replace(folder, trash)
    fsync_path(folder.parent)
    shutil.rmtree(trash)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove our own temporary/trash entries (TEMPORARY_NAME) left directly in `folder` by a killed process."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if TEMPORARY_NAME.match(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def nearest_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: Path, what: str) -> None:
    """`path` is, or can be created as, a folder we may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder.")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{what} '{path}' cannot be created: '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}' cannot be written: '{existing}' is read-only for this user.")


def check_writable_file(path: Path, what: str) -> None:
    """`path` names a file (not a folder) whose folder exists or can be created and can be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a file name.")
    check_writable_folder(path.parent if str(path.parent) else Path("."), f"the folder of {what}")


def os_error_sentence(error: OSError, path: Path | str) -> str:
    """One sentence for a failed write (read-only, full disk, missing folder, ...)."""
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
               errno.ENOTDIR: "a part of the path is a file", errno.EDQUOT: "disk quota exceeded",
               errno.ENOENT: "a folder on the way does not exist"}  # fmt: skip
    return f"cannot write '{path}': {reasons.get(error.errno, error.strerror or error.__class__.__name__)}."
