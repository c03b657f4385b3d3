"""FSDP2, gradient accumulation, activation checkpointing and sharded checkpoints on CPU (gloo, 2 processes).

The reference of every 2-process run is one plain process with the same global batch: with train.grad_accum_steps
2, micro-batch m of the one process is virtual rank m of two (accumulation.py), the same items and the same noise.
So the 2-process weights and losses equal the reference's up to float32 reduction order: rtol 1e-4 on weights,
where the measured difference is <= 5e-6 relative and a run on other samples (another seed) differs by O(1).
One torchrun launch runs all 2-process jobs (imports dominate their time); its last job is killed on purpose.
"""

import json
import shutil
import subprocess

import pytest
import torch
from conftest import run_two_processes, tree
from safetensors.torch import load_file
from tiny_pipelines import save_captioned_images, save_class_images, save_tiny

from scm_distill.checkpoint import list_checkpoints
from scm_distill.config import resolve
from scm_distill.sharded_checkpoint import read_sharded_tensors
from scm_distill.trainer import distill


def torchrun(jobs: list[dict], folder) -> subprocess.CompletedProcess:
    """Run tests/fsdp_worker.py on 2 CPU processes with these jobs."""
    spec = folder / f"jobs-{len(list(folder.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    return run_two_processes("fsdp_worker.py", str(spec), timeout=900)


def rank0_error(done: subprocess.CompletedProcess) -> str:
    """The traceback of rank 0 (torchrun's own summary hides it)."""
    return "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank0]:"))[-4000:]


def unet_config(teacher, output, **train) -> dict:
    """The tiny UNet teacher: 1 conversion + 3 sCD steps at batch 4 per process, checkpoints at steps 2 and 4."""
    settings = {"max_steps": 3, "convert_steps": 1, "batch_size": 4, "sample_every": 4, "checkpoint_every": 2,
                "log_every": 1, "parallel": "fsdp", **train}  # fmt: skip
    return {"teacher": str(teacher), "output": str(output), "data": {"spec": "digits"}, "train": settings,
            "sampling": {"teacher_steps": 2, "grid_size": 2}}  # a grid at the end: sharded models sample collectively


def dit_config(teacher, data, output, **train) -> dict:
    """The tiny DiT (a transformer teacher with a guidance input): 1 conversion + 2 sCD steps at batch 2."""
    settings = {"max_steps": 2, "convert_steps": 1, "batch_size": 2, "sample_every": 0, "checkpoint_every": 0,
                "log_every": 1, "parallel": "fsdp", **train}  # fmt: skip
    return {"teacher": str(teacher), "output": str(output), "data": {"spec": str(data)},
            "sampling": {"teacher_steps": 2, "grid_size": 2}, "guidance": {"embedding_dim": 32}, "train": settings}


def lora_config(teacher, data, output, **train) -> dict:
    """The tiny SD teacher with a rank-4 LoRA student (sharing the teacher's UNet): 1 conversion + 2 sCD steps."""
    settings = {"max_steps": 2, "convert_steps": 1, "batch_size": 2, "sample_every": 0, "checkpoint_every": 0,
                "log_every": 1, "parallel": "fsdp", **train}  # fmt: skip
    return {"teacher": str(teacher), "output": str(output), "data": {"spec": str(data)}, "lora": {"rank": 4},
            "sampling": {"teacher_steps": 2, "grid_size": 2}, "guidance": {"embedding_dim": 32}, "train": settings}


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_student(run_dir) -> dict[str, torch.Tensor]:
    """The student of the run's last checkpoint, whole, from either checkpoint layout."""
    last = list_checkpoints(run_dir)[-1]
    if (last / "student.safetensors").is_file():
        return load_file(last / "student.safetensors")
    tensors = read_sharded_tensors(last)
    return {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}


def assert_weights_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return save_tiny("dit", root / "teacher"), save_class_images(root / "data")


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return save_tiny("sd", root / "teacher"), save_captioned_images(root / "data")


@pytest.fixture(scope="module")
def two_process_runs(tiny_teacher, dit_files, sd_files, tmp_path_factory):
    """FSDP straight, FSDP stopped at step 2 and resumed on 2 processes, DDP straight, FSDP DiT with activation
    checkpointing, an FSDP SD LoRA student, and last an FSDP run whose rank 1 is SIGKILLed while DCP writes the step-4
    shards."""
    root = tmp_path_factory.mktemp("two")
    dit_teacher, dit_data = dit_files
    runs = {name: root / name for name in ("fsdp", "resumed", "ddp", "dit", "lora", "killed")}
    jobs = [{"config": unet_config(tiny_teacher, runs["fsdp"])},
            {"config": unet_config(tiny_teacher, runs["resumed"], max_steps=1)},
            {"config": unet_config(tiny_teacher, runs["resumed"]), "resume": "latest"},
            {"config": unet_config(tiny_teacher, runs["ddp"], parallel="ddp")},
            {"config": dit_config(dit_teacher, dit_data, runs["dit"], activation_checkpointing=True)},
            {"config": lora_config(*sd_files, runs["lora"])},
            {"config": unet_config(tiny_teacher, runs["killed"]), "kill_rank_at": [1, "step-0000004"]}]  # fmt: skip
    done = torchrun(jobs, root)
    assert done.returncode != 0 and "SIGKILL" in done.stderr, rank0_error(done)  # the last job's kill
    assert all((runs[name] / "pipeline").is_dir() for name in ("fsdp", "resumed", "ddp", "dit", "lora")), \
        rank0_error(done)  # fmt: skip
    return runs


@pytest.fixture(scope="module")
def references(tiny_teacher, dit_files, sd_files, tmp_path_factory):
    """One plain process, grad_accum_steps 2: the same global batch as 2 processes."""
    root = tmp_path_factory.mktemp("one")
    configs = {"unet": unet_config(tiny_teacher, root / "unet", parallel="ddp", grad_accum_steps=2),
               "dit": dit_config(*dit_files, root / "dit", parallel="ddp", grad_accum_steps=2),
               "lora": lora_config(*sd_files, root / "lora", parallel="ddp", grad_accum_steps=2)}  # fmt: skip
    return {name: distill(resolve(cli=config)).run_dir for name, config in configs.items()}


def test_fsdp_on_two_processes_equals_one_process_with_the_same_global_batch(two_process_runs, references,
                                                                            tiny_teacher):  # fmt: skip
    for run, reference in (("fsdp", "unet"), ("dit", "dit"), ("lora", "lora")):
        torch.testing.assert_close(losses(two_process_runs[run]), losses(references[reference]), rtol=1e-5, atol=0)
        assert_weights_close(final_student(two_process_runs[run]), final_student(references[reference]))
    initial = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    trained = final_student(two_process_runs["fsdp"])
    assert any(not torch.equal(trained[f"model.network.{k}"], v) for k, v in initial.items())  # it trained


def test_accumulation_equals_more_processes(two_process_runs, references):
    """Batch 4 x 2 micro-batches on one process = batch 4 on each of 2 DDP processes (global batch 8)."""
    torch.testing.assert_close(losses(two_process_runs["ddp"]), losses(references["unet"]), rtol=1e-5, atol=0)
    assert_weights_close(final_student(two_process_runs["ddp"]), final_student(references["unet"]))


def test_sharded_checkpoint_resumes_on_two_processes_with_the_uninterrupted_losses(two_process_runs):
    straight, resumed = two_process_runs["fsdp"], two_process_runs["resumed"]
    assert losses(resumed) == losses(straight)
    assert_weights_close(final_student(resumed), final_student(straight))
    shards = sorted(p.name for p in (list_checkpoints(straight)[-1] / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)  # one file per process


def test_fsdp_export_equals_the_ddp_export(two_process_runs):
    fsdp, ddp = two_process_runs["fsdp"] / "pipeline", two_process_runs["ddp"] / "pipeline"
    assert tree(fsdp) == tree(ddp)
    for path in fsdp.rglob("*"):
        twin = ddp / path.relative_to(fsdp)
        if path.suffix == ".safetensors":
            assert_weights_close(load_file(path), load_file(twin))
        elif path.suffix == ".json":  # the description's facts hold the training time, which differs
            first, second = (json.loads(p.read_text()) for p in (path, twin))
            first.pop("facts", None), second.pop("facts", None)
            assert first == second, path.name


def test_a_kill_during_a_sharded_checkpoint_leaves_the_previous_one_resumable_on_one_process(
        two_process_runs, tiny_teacher):  # fmt: skip
    """Rank 1 was SIGKILLed while DCP wrote the step-4 shards; step 2 stays the newest checkpoint and one process
    with 2 micro-batches resumes it with the losses of the uninterrupted 2-process run."""
    out = two_process_runs["killed"]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
    assert (out / "checkpoints" / ".step-0000004.tmp").is_dir()  # the write was under way
    distill(resolve(cli=unet_config(tiny_teacher, out, grad_accum_steps=2)), resume="latest")
    straight = two_process_runs["fsdp"]
    torch.testing.assert_close(losses(out), losses(straight), rtol=1e-5, atol=0)
    assert_weights_close(final_student(out), final_student(straight))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert not (out / "checkpoints" / ".step-0000004.tmp").exists()


def test_resuming_on_other_processes_needs_the_same_global_batch(two_process_runs, tiny_teacher, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(two_process_runs["resumed"], out)
    before = tree(out)
    with pytest.raises(ValueError, match="processes x train.grad_accum_steps = 2, this run has 1; resume the same "
                                         "run with train.grad_accum_steps 2 on 1 process"):  # fmt: skip
        distill(resolve(cli=unet_config(tiny_teacher, out, max_steps=5)), resume="latest")
    assert tree(out) == before
