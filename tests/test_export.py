"""The export: loads in a process that cannot import scm_distill, reproduces our sampler, and publishes."""

import json

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import REPO, run_cli

from scm_distill.export.push import push_to_hub


def test_export_holds_the_ema_student_in_the_teacher_class(tiny_run):
    """A stock DDPMPipeline folder: the EMA student as the teacher's UNet2DModel, read as v-prediction by a stock
    LCMScheduler on the teacher's schedule, the description and the card; nothing else."""
    from diffusers import LCMScheduler, UNet2DModel

    folder = tiny_run.export_dir
    unet = UNet2DModel.from_pretrained(folder / "unet")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, tiny_run.ema.network.state_dict()[key]), key
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "linear"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model_index.json", "samples.png", "scheduler",
                                                        "scm_distill.json", "unet"]  # fmt: skip
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
    url = push_to_hub(folder, "me/digits-2step", token="hf_fake", license="apache-2.0")
    assert url.endswith("/commit/1")
    assert ("POST", "/api/repos/create") in fake_hub.requests
    assert fake_hub.uploaded == ["README.md", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
                                 "scm_distill.json", "unet/config.json",
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
