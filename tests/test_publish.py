"""Publishing (issue 16 item 5): `distill --push-to-hub` pushes the final export; the uploaded card has the real
repository id, the licence (the teacher's, else --license), base_model as a Hub id, and no local path. The Hub's
HTTP layer is faked (test_export.FakeHub)."""

import base64
import json
import shutil

import httpx2
import huggingface_hub
import pytest
from conftest import tree
from test_export import FakeHub

from scm_distill.cli import main
from scm_distill.export.push import push_to_hub

TINY = ["--data", "digits", "--max-steps", "1", "--batch-size", "8", "--set", "train.convert_steps=1",
        "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0"]  # fmt: skip


class RecordingHub(FakeHub):
    """FakeHub that also keeps the uploaded files' contents."""

    def __call__(self, request):
        if "/commit/" in request.url.path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            self.contents = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}  # fmt: skip
        return super().__call__(request)


@pytest.fixture
def hub():
    recording = RecordingHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(recording)))
    yield recording
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


@pytest.fixture
def licensed_teacher(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\nlibrary_name: diffusers\n---\n# a tiny teacher\n")
    return teacher


def test_distill_push_to_hub_uploads_a_complete_card(licensed_teacher, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    status = main(["distill", "--teacher", str(licensed_teacher), "--output", str(tmp_path / "run"), *TINY,
                   "--set", "export.base_model_id=google/ddpm-cifar10-32", "--push-to-hub",
                   "--hub-model-id", "me/digits-2step"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert "pushed: https://huggingface.co/me/digits-2step/commit/1" in capsys.readouterr().out
    assert not any(path.startswith(("checkpoints", "log")) for path in hub.uploaded)  # the export only
    card = hub.contents["README.md"].decode()
    assert "license: mit" in card and "base_model: google/ddpm-cifar10-32" in card
    assert 'from_pretrained("me/digits-2step")' in card and "PATH_OR_REPO_ID" not in card
    assert str(tmp_path) not in card and "/tmp" not in card  # no local path anywhere in the card
    assert "| optimizer | radam, lr 0.0001" in card and "| sCD steps x batch | 1 x 8 |" in card
    assert json.loads(hub.contents["scm_distill.json"])["license"] == "mit"


def test_push_takes_license_when_the_teacher_has_none(tiny_run, tmp_path, hub):
    folder = tmp_path / "export"
    shutil.copytree(tiny_run.export_dir, folder)
    with pytest.raises(ValueError, match="states no licence, so the export has none; pass --license"):
        push_to_hub(folder, "me/digits-2step", token="hf_fake")
    assert hub.requests == []  # refused before any request
    push_to_hub(folder, "me/digits-2step", token="hf_fake", license="apache-2.0")
    card = hub.contents["README.md"].decode()
    assert "license: apache-2.0" in card and "base_model" not in card  # a local teacher: no base_model at all


def test_push_to_hub_without_a_licence_is_refused_before_training(tiny_teacher, tmp_path, capsys):
    status = main(["distill", "--teacher", str(tiny_teacher), "--output", str(tmp_path / "run"), *TINY,
                   "--push-to-hub", "--hub-model-id", "me/x"])  # fmt: skip
    assert status == 1 and "has no licence in its model card; pass --license" in capsys.readouterr().err
    assert tree(tmp_path) == []
    status = main(["distill", "--teacher", str(tiny_teacher), "--output", str(tmp_path / "run"), *TINY,
                   "--push-to-hub"])  # fmt: skip
    assert status == 1 and "--push-to-hub needs --hub-model-id" in capsys.readouterr().err
