"""Bad inputs given to the CLI in-process: each must exit 1 with exactly one error sentence and leave files alone.

`refuses` runs `scm_distill.cli.main(argv)`, asserts exit status 1, one error line on stderr (progress-bar lines
of a run that failed mid-way are not errors and are ignored) containing `match`, no traceback, the paths in
`absent` not created and the folders in `untouched` byte-for-byte unchanged. With SCM_BAD_INPUT_LOG=FILE set,
every call appends one JSON line {"argv", "one_sentence", "nothing_written"} to FILE (the fuzz test logs the
examples it finds refused too), so the bad inputs the tests try can be counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from scm_distill.cli import main


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and 'dir' for folders) under `folder`."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress lines (carriage-return redraws of 'distill (N sCD steps): ...')."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and not re.match(r"distill( \(.*\))?:", line)]


def log_bad_input(argv, one_sentence: bool, nothing_written: bool) -> None:
    path = os.environ.get("SCM_BAD_INPUT_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"argv": [str(a) for a in argv], "one_sentence": one_sentence,
                                     "nothing_written": nothing_written}) + "\n")  # fmt: skip


def refuses(capsys, argv: list, match: str, absent: tuple = (), untouched: tuple = (), code: int = 1) -> str:
    """Run the CLI on a bad input; returns the error line (see the module docstring)."""
    before = {Path(folder): snapshot(folder) for folder in untouched}
    capsys.readouterr()
    status = main([str(a) for a in argv])
    lines = error_lines(capsys.readouterr().err)
    one_sentence = status == code and len(lines) == 1 and match in lines[0] and "Traceback" not in lines[0]
    nothing_written = not any(Path(p).exists() for p in absent) and all(
        snapshot(folder) == state for folder, state in before.items())  # fmt: skip
    log_bad_input(argv, one_sentence, nothing_written)
    assert status == code, (status, lines)
    assert len(lines) == 1 and match in lines[0], lines
    assert nothing_written, [p for p in absent if Path(p).exists()] or "a folder changed"
    return lines[0]
