"""One process per run folder: an advisory lock file holding the owner's pid, host and start time.

The lock is created atomically (O_CREAT | O_EXCL) and removed when the run ends. A lock whose process is gone
(same host, pid not alive) is stale: it is taken over with a warning. A lock held by a live process, or by a
process on another host (which cannot be checked), refuses the second run with one sentence.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from .errors import UserError
from .files import os_error_sentence

LOCK_NAME = ".scm-distill.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def is_stale(owner: dict | None) -> bool:
    return owner is not None and owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"])


class RunLock:
    """`with RunLock(folder):` holds the folder's lock file for the block (the folder must exist)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise UserError(os_error_sentence(error, self.path)) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.owner) + "\n")
        return True

    def acquire(self) -> RunLock:
        if self._create():
            return self
        owner = read_owner(self.path)
        if is_stale(owner):
            warnings.warn(f"taking over the stale lock '{self.path}' of process {owner['pid']}, which has ended.",
                          stacklevel=2)  # fmt: skip
            self.path.unlink(missing_ok=True)
            if self._create():
                return self
            owner = read_owner(self.path)
        if owner is None:
            raise UserError(f"run folder '{self.path.parent}' is locked by '{self.path}', which cannot be read; if no "
                            f"scm-distill process uses the folder, delete that file.")  # fmt: skip
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        raise UserError(f"run folder '{self.path.parent}' is in use by process {owner['pid']} on "
                        f"{owner.get('host', '?')} (since {started}); wait for it to finish, or delete "
                        f"'{self.path}' if that process is gone.")  # fmt: skip

    def release(self) -> None:
        if read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
