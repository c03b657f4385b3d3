"""The export: loads in a process that cannot import scm_distill, reproduces our sampler, and publishes."""

import json
import subprocess
import sys

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import REPO, run_cli

from scm_distill.export.push import push_to_hub
from scm_distill.generate import consistency_samples

# Runs in a fresh interpreter where `import scm_distill` fails, as on a user's machine.
LOAD_WITHOUT_SCM_DISTILL = """
import sys
sys.modules["scm_distill"] = None
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
out = {}
for steps in (2, 1):
    kwargs = {} if steps == 2 else {"num_inference_steps": 1}  # the default call must be the 2-step sampler
    out[steps] = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="pt", **kwargs).images
pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
assert len(pil) == 2 and pil[0].size == (8, 8), pil
torch.save({"cls": type(pipe).__name__, **out}, sys.argv[2])
"""


def test_export_loads_without_scm_distill_and_matches_our_sampler(tiny_run, tmp_path):
    script, result_file = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(LOAD_WITHOUT_SCM_DISTILL)
    done = subprocess.run([sys.executable, str(script), str(tiny_run.export_dir), str(result_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = torch.load(result_file)
    assert loaded["cls"] == "SCMUNet2DPipeline"
    index = json.loads((tiny_run.export_dir / "model_index.json").read_text())
    for steps in (2, 1):
        x0 = consistency_samples(tiny_run.ema.model, (3, 1, 8, 8), steps, index["t_max"], index["t_mid"],
                                 torch.Generator().manual_seed(7))  # fmt: skip
        assert torch.equal((x0 / 2 + 0.5).clamp(0, 1), loaded[steps]), f"{steps}-step samples differ"


def test_export_holds_the_ema_student_in_the_teacher_class(tiny_run):
    from diffusers import DDPMScheduler, UNet2DModel

    folder = tiny_run.export_dir
    unet = UNet2DModel.from_pretrained(folder / "unet")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, tiny_run.ema.network.state_dict()[key]), key
    assert DDPMScheduler.from_pretrained(folder / "scheduler").config.prediction_type == "v_prediction"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["t_mid"] == pytest.approx(1.1)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model_index.json", "pipeline_scm_unet2d.py",
                                                        "samples.png", "scheduler", "unet"]  # fmt: skip
    assert not list(folder.rglob("*.bin")) and "logvar" not in json.dumps(list(unet.state_dict()))


class FakeHub:
    """The Hub's HTTP API as far as create_repo + upload_folder use it; records what was sent."""

    def __init__(self):
        self.requests, self.uploaded = [], []

    def __call__(self, request):
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/digits-2step"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})  # fmt: skip
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            self.uploaded = sorted(line["value"]["path"] for line in lines if line["key"] == "file")
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/digits-2step/commit/1",
                                              "commitOid": "1" * 40})  # fmt: skip
        return httpx2.Response(404, json={"error": f"unexpected {path}"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_push_uploads_the_export_and_never_checkpoints(tiny_run, tmp_path, fake_hub):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(tiny_run.export_dir, folder)
    (folder / "checkpoints" / "step-0000001").mkdir(parents=True)
    (folder / "checkpoints" / "step-0000001" / "ema.safetensors").write_bytes(b"x")
    url = push_to_hub(folder, "me/digits-2step", token="hf_fake")
    assert url.endswith("/commit/1")
    assert ("POST", "/api/repos/create") in fake_hub.requests
    assert fake_hub.uploaded == ["README.md", "model_index.json", "pipeline_scm_unet2d.py", "samples.png",
                                 "scheduler/scheduler_config.json", "unet/config.json",
                                 "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip


def test_push_refuses_what_is_not_an_export(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="no model_index.json"):
        push_to_hub(tmp_path, "me/x")
    with pytest.raises(ValueError, match="is not a Hub repository id"):
        push_to_hub(tiny_run.export_dir, "a/b/c")
    done = run_cli("push", str(tmp_path / "missing"), "--repo-id", "me/x")
    assert done.returncode == 1 and "is not a folder" in done.stderr


def test_sample_command_writes_a_grid(tiny_run, tmp_path):
    done = run_cli("sample", "--model", str(tiny_run.export_dir), "--num-images", "4", "--output",
                   str(tmp_path / "grid.png"), "--trust-remote-code", cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "grid.png").stat().st_size > 0
