"""Gradient accumulation, activation checkpointing and the sharded layout in one process; bad input for all three
(one sentence, exit status 1, nothing written). The 2-process equivalences are in test_parallel.py."""

import json

import pytest
import torch
from conftest import REPO, ToyNet, tree
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from scm_distill.accumulation import micro_batch_indices
from scm_distill.cli import main
from scm_distill.config import SCDConfig, resolve
from scm_distill.data import batch_indices
from scm_distill.families import load_teacher
from scm_distill.families.module import ModuleTeacher
from scm_distill.families.unet2d import UNet2DTeacher
from scm_distill.objective import SCDLoss
from scm_distill.parallel import enable_activation_checkpointing, non_reentrant
from scm_distill.student import student_from_teacher
from scm_distill.trainer import distill


def fails(capsys, *argv, match: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and match in err, err
    return err


def config(teacher, output, **train):
    settings = {"max_steps": 2, "convert_steps": 0, "batch_size": 4, "sample_every": 0, "checkpoint_every": 0,
                "log_every": 1, **train}  # fmt: skip
    return resolve(cli={"teacher": str(teacher), "output": str(output), "data": {"spec": "digits"},
                        "train": settings})  # fmt: skip


@pytest.mark.parametrize(("world", "accum"), [(1, 3), (2, 2), (3, 1)])
def test_micro_batches_of_a_step_are_the_batch_of_size_batch_times_n(world, accum):
    """Each rank's micro-batches, in order, are exactly its batch of batch_size x N (same items, same order)."""
    for step in (0, 5, 40):  # 40: past the first epoch of 1,797 digits at every global batch here
        for rank in range(world):
            micro = [micro_batch_indices(step, m, 7, accum, 1797, 3, rank, world) for m in range(accum)]
            assert torch.equal(torch.cat(micro), batch_indices(step, 7 * accum, 1797, 3, rank, world))


def test_a_non_finite_micro_batch_skips_the_whole_step(tiny_teacher, tmp_path, monkeypatch):
    """Micro-batch 1 of step 0 is NaN, micro-batch 0 is finite: the step is skipped, the weights are the teacher's."""
    prepare, calls = UNet2DTeacher.prepare_batch, []

    def second_is_nan(self, batch, generator):
        x0, condition = prepare(self, batch, generator)
        calls.append(len(calls))
        return (torch.full_like(x0, float("nan")) if len(calls) == 2 else x0), condition

    monkeypatch.setattr(UNet2DTeacher, "prepare_batch", second_is_nan)
    result = distill(config(tiny_teacher, tmp_path / "run", max_steps=1, grad_accum_steps=2))
    records = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and records[0]["skipped"] == 1 and records[0]["loss"] != records[0]["loss"]  # NaN
    initial = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in initial.items():
        assert torch.equal(result.student.network.state_dict()[key], value), key


def test_activation_checkpointing_recomputes_only_the_gradient_pass(tiny_teacher):
    """Checkpointing changes no number (same loss and gradients) and never runs inside the JVP (under no_grad)."""
    teacher = load_teacher(str(tiny_teacher))
    plain, checkpointed = (student_from_teacher(teacher.model) for _ in range(2))
    grad_enabled_at_calls = []

    def recording(module, *args):
        grad_enabled_at_calls.append(torch.is_grad_enabled())
        return non_reentrant(module, *args)

    assert enable_activation_checkpointing(checkpointed.network, recording) == 1
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loss_fn = SCDLoss(teacher.model, SCDConfig(tangent_warmup_steps=1))
    results = []
    for student in (plain, checkpointed):
        loss, _ = loss_fn(student, student, x0, {}, step=1, generator=torch.Generator().manual_seed(1))
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-8, msg=name)
    assert grad_enabled_at_calls and all(grad_enabled_at_calls)  # blocks recomputed, none inside the JVP


def test_fsdp_on_one_process_says_so_and_writes_sharded_checkpoints(tiny_teacher, tmp_path, capsys):
    run = distill(config(tiny_teacher, tmp_path / "run", parallel="fsdp", checkpoint_every=1)).run_dir
    assert "train.parallel fsdp on one process has nothing to shard" in capsys.readouterr().err
    first = run / "checkpoints" / "step-0000001"
    assert json.loads((first / "state.json").read_text())["layout"] == "sharded"
    assert [p.suffix for p in (first / "shards").iterdir()] == [".safetensors"]
    straight = numbers((run / "log.jsonl").read_text())
    distill(config(tiny_teacher, run, parallel="fsdp"), resume=str(first))  # step 2 again, from the shards
    assert numbers((run / "log.jsonl").read_text()) == straight  # bitwise, as with replicated checkpoints


def numbers(log: str) -> list[tuple[float, float]]:
    return [(record["loss"], record["grad_norm"]) for record in map(json.loads, log.splitlines())]


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["accum-0", "compiled-jvp-with-fsdp", "deepspeed", "fsdp1", "fsdp2-with-ddp"])
def test_bad_settings_and_launchers_are_one_sentence(case, capsys, tiny_teacher, tmp_path, monkeypatch):
    env = {"deepspeed": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
           "fsdp1": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
           "fsdp2-with-ddp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}}.get(case, {})  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    match = {"accum-0": "train.grad_accum_steps must be at least 1, got 0.",
             "compiled-jvp-with-fsdp": "objective.compile_jvp is not supported with train.parallel fsdp yet",
             "deepspeed": "DeepSpeed launches are not supported: torch.func.jvp does not run through ZeRO-3",
             "fsdp1": "accelerate's FSDP1 is not supported",
             "fsdp2-with-ddp": "the accelerate config asks for FSDP2 but train.parallel is ddp"}[case]  # fmt: skip
    sets = {"accum-0": ["train.grad_accum_steps=0"],
            "compiled-jvp-with-fsdp": ["objective.compile_jvp=true", "train.parallel=fsdp"],
            "fsdp2-with-ddp": ["train.parallel=ddp"]}.get(case, [])  # unset, train.parallel takes accelerate's
    fails(capsys, "distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(tmp_path / "out"),
          *(arg for item in sets for arg in ("--set", item)), match=match)  # fmt: skip
    assert tree(tmp_path) == []


def test_activation_checkpointing_on_a_model_without_it_is_refused(tmp_path):
    teacher = ModuleTeacher(ToyNet(), prediction="epsilon", alphas_cumprod=DDPMScheduler().alphas_cumprod,
                            sample_shape=(1, 8, 8))  # fmt: skip
    with pytest.raises(ValueError, match="train.activation_checkpointing needs a diffusers model that supports "
                                         "gradient checkpointing; the ToyNet network does not."):  # fmt: skip
        distill(config("my-net", tmp_path / "out", activation_checkpointing=True), teacher=teacher)
    assert tree(tmp_path) == []


def test_checkpoints_of_another_layout_or_model_are_refused(capsys, tiny_teacher, tmp_path):
    sharded = distill(config(tiny_teacher, tmp_path / "sharded", parallel="fsdp", max_steps=1)).run_dir
    replicated = distill(config(tiny_teacher, tmp_path / "replicated", max_steps=1)).run_dir
    checkpoint = sharded / "checkpoints" / "step-0000001"
    fails(capsys, "distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(replicated),
          "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "train.convert_steps=0",
          "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0", "--set", "train.log_every=1",
          "--resume", str(checkpoint),
          match="is a sharded checkpoint of a train.parallel fsdp run; resume it with train.parallel fsdp")  # fmt: skip
    wider = tmp_path / "wider"  # another model: the tiny UNet with 24 instead of 16 channels at its second level
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 24),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4, layers_per_block=1,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(wider)
    other = distill(config(wider, tmp_path / "other", parallel="fsdp", max_steps=1)).run_dir
    before = tree(other)
    with pytest.raises(ValueError, match=r"checkpoint '.*step-0000001' does not match the model: 'student\..*' has "
                                         r"shape \(16,\), expected \(24,\)"):  # fmt: skip
        distill(config(wider, other, parallel="fsdp", max_steps=1), resume=str(checkpoint))
    assert tree(other) == before


def accelerate_environment(config_file) -> dict:
    """The environment `accelerate launch --config_file FILE` gives the training processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file),
                                                                              "train.py"]))  # fmt: skip
    return prepare_multi_gpu_env(args)


def test_the_fsdp2_accelerate_config_is_accepted_and_fsdp1_refused(tmp_path):
    from scm_distill.parallel import check_launcher

    config = REPO / "recipes" / "accelerate" / "fsdp2.yaml"
    environment = accelerate_environment(config)
    check_launcher(environment, "fsdp")
    with pytest.raises(ValueError, match="asks for FSDP2 but train.parallel is ddp"):
        check_launcher(environment, "ddp")
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(config.read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    with pytest.raises(ValueError, match="accelerate's FSDP1 is not supported"):
        check_launcher(accelerate_environment(fsdp1), "fsdp")
