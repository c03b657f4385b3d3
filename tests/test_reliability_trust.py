"""Issue 15 regressions, defects 3 and 4: no code runs that nobody asked for.

Payloads are real: a pipeline file that writes a marker file when imported, and pickles that write a marker file
when unpickled. Without --trust-remote-code / trust_remote_code=True, and for pickles always, the marker must not
appear.
"""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import save_tiny_pipeline
from refusals import refuses

from scm_distill.cli import main
from scm_distill.errors import UserError
from scm_distill.export.load import load_export, shipped_code
from scm_distill.families import load_teacher
from scm_distill.metrics import EFFICIENTNET_LITE0, compute_metrics


def plant_payload(source: str, marker) -> str:
    """Python source that writes `marker` when it runs, appended to a pipeline file."""
    return f"{source}\n\nopen({str(marker)!r}, 'w').write('the payload ran')\n"


@pytest.fixture
def payload_export(tiny_run, tmp_path):
    """A copy of a UNet2D export made to ship its own pipeline file (as SD3/Sana/DiT exports do), which carries a
    payload."""
    export = shutil.copytree(tiny_run.export_dir, tmp_path / "export")
    index = json.loads((export / "model_index.json").read_text())
    (export / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline_scm_unet2d",
                                                                                  "SCMUNet2DPipeline"]}))
    source = "from diffusers import DDPMPipeline\n\n\nclass SCMUNet2DPipeline(DDPMPipeline):\n    pass\n"
    (export / "pipeline_scm_unet2d.py").write_text(plant_payload(source, tmp_path / "marker"))
    return export


def test_sample_does_not_run_an_exports_code_without_the_flag(capsys, payload_export, tmp_path):
    out = tmp_path / "grid.png"
    refuses(capsys, ["sample", "--model", payload_export, "--output", out],
            "ships Python code (pipeline_scm_unet2d.py) that loading it would run; pass --trust-remote-code",
            absent=[tmp_path / "marker", out])  # fmt: skip
    assert main(["sample", "--model", str(payload_export), "--output", str(out), "--num-images", "2",
                 "--trust-remote-code"]) == 0  # fmt: skip
    assert (tmp_path / "marker").read_text() == "the payload ran" and out.is_file()  # the payload was real


def test_python_api_needs_trust_remote_code(payload_export, tmp_path):
    with pytest.raises(UserError, match="trust_remote_code=True"):
        load_export(payload_export)
    assert not (tmp_path / "marker").exists()


def test_bench_and_evaluate_do_not_run_a_teachers_code(capsys, payload_export, tiny_run, tmp_path):
    from scm_distill.evaluation.bench import end_to_end_ms

    with pytest.raises(UserError, match="pass --trust-remote-code"):  # bench times the teacher's own pipeline
        end_to_end_ms(payload_export, 1, 2, torch.device("cpu"), 1, "a prompt")
    for command in (["bench", "--model", tiny_run.export_dir, "--teacher", payload_export, "--no-scaling"],
                    ["evaluate", "--model", tiny_run.export_dir, "--teacher", payload_export, "--reference",
                     "digits", "--num-samples", "4"]):  # fmt: skip
        refuses(capsys, [*command, "--output", tmp_path / "out"], "pass --trust-remote-code",
                absent=[tmp_path / "marker", tmp_path / "out"])  # fmt: skip


def test_teacher_folders_that_ship_code_are_refused(capsys, tmp_path):
    teacher = save_tiny_pipeline(tmp_path / "teacher")
    index = json.loads((teacher / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline_evil", "Evil"]}))
    (teacher / "pipeline_evil.py").write_text(plant_payload("from diffusers import DDPMPipeline as Evil",
                                                            tmp_path / "marker"))  # fmt: skip
    with pytest.raises(UserError, match="teacher .* ships Python code .*pipeline_evil.py"):
        load_teacher(str(teacher))
    out = tmp_path / "out"
    refuses(capsys, ["distill", "--teacher", teacher, "--data", "digits", "--output", out, "--batch-size", "4"],
            "pass --trust-remote-code", absent=[out, tmp_path / "marker"])  # fmt: skip
    assert load_teacher(str(teacher), trust_remote_code=True).sample_shape == (1, 8, 8)  # components only


def test_custom_components_count_as_shipped_code(tmp_path):
    (tmp_path / "guidance").mkdir()
    (tmp_path / "guidance" / "scm_guidance.py").write_text("")
    index = {"_class_name": "DiTPipeline", "unet": ["diffusers", "UNet2DModel"], "guidance": ["scm_guidance", "G"],
             "other": ["no_such_package_xyz", "X"], "empty": [None, None]}  # fmt: skip
    assert shipped_code(tmp_path, index) == ["guidance/scm_guidance.py", "other/no_such_package_xyz.py"]


class Payload:
    """Unpickling this runs `exec(code)`: what a malicious weights or cache file does."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').write('the payload ran')"

    def __reduce__(self):
        return exec, (self.code,)


def test_pickled_inception_weights_are_refused(capsys, tiny_run, tmp_path):
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({"weights": Payload(tmp_path / "marker")}, weights)
    out = tmp_path / "eval"
    refuses(capsys, ["evaluate", "--model", tiny_run.export_dir, "--reference", "digits", "--num-samples", "4",
                     "--feature-extractor", "inception-v3-compat", "--inception-weights", weights, "--output", out,
                     "--trust-remote-code"], "holds pickled objects other than tensors, which could run code",
            absent=[out, tmp_path / "marker"])  # fmt: skip


def test_a_pickled_metrics_cache_is_never_loaded(tmp_path):
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # the file names torch-fidelity's own cache would read: <key>-<pixel digest>-<extractor>-features-<layer>.pt
    digest = hashlib.sha256(str(tuple(reference.shape)).encode())
    digest.update(reference.numpy().tobytes())
    stem = f"ref-{digest.hexdigest()[:16]}-{EFFICIENTNET_LITE0}"
    cache = tmp_path / ".fidelity-cache"
    cache.mkdir()
    for name in (f"{stem}-features-pool.pt", f"{stem}-stat-fid-pool.pt"):
        torch.save(Payload(tmp_path / "marker"), cache / name)
    metrics = compute_metrics(images, reference, feature_extractor=EFFICIENTNET_LITE0, kid=False, prc=False,
                              cache_dir=str(cache), reference_cache_key="ref")  # fmt: skip
    assert metrics["fid"] >= 0 and not (tmp_path / "marker").exists()
    assert sorted(p.suffix for p in cache.iterdir()) == [".pt", ".pt", ".safetensors"]  # ours is safetensors
