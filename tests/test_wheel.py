"""A non-editable install (issue 16 item 8): the wheel carries the recipes and the embedded teacher, so
`scm-distill demo` runs from a fresh virtual environment outside the source tree. Costs ~10 minutes on 2 busy cores (the
wheel build and the demo's 100 conversion steps and evaluation): runs only with SCM_WHEEL_TEST=1."""

import os
import shutil
import site
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.skipif(not os.environ.get("SCM_WHEEL_TEST"), reason="set SCM_WHEEL_TEST=1 (builds a wheel, ~10 min)")
def test_a_non_editable_install_runs_the_demo(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo-output", ".pytest_cache"))  # fmt: skip
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wheel = next(wheels.glob("scm_distill-*.whl"))
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no PYTHONPATH: nothing of the source tree
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, timeout=600, env=clean)  # fmt: skip
    # the dependencies (torch, diffusers, ...) from this interpreter's site-packages, after the venv's own (which
    # holds the installed wheel; no source tree on the path: the demo runs in an empty folder)
    fresh_site = next((venv / "lib").glob("python*/site-packages"))
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**clean, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([venv / "bin" / "scm-distill", "demo", "--max-steps", "2", "--num-samples", "64"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "demo-output" / "report.md").is_file()
    where = subprocess.run([venv / "bin" / "python", "-c", "import scm_distill; print(scm_distill.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(venv) in where and str(REPO) not in where
