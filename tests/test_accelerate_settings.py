"""accelerate's own settings (issue 16 item 3): `accelerate launch` / `accelerate config` give mixed precision,
gradient accumulation and the distributed type where the recipe leaves them unset; a contradiction is one sentence."""

import pytest
from accelerate.state import AcceleratorState
from test_trainer import tiny_config

from scm_distill import trainer
from scm_distill.config import DistillConfig, override
from scm_distill.errors import UserError
from scm_distill.parallel import launcher_settings


def settings(environ, **train):
    config = launcher_settings(override(DistillConfig(), {"train": train}), environ)
    return config.train.mixed_precision, config.train.grad_accum_steps, config.train.parallel


def test_unset_fields_take_accelerates_values():
    assert settings({}) == ("no", 1, "ddp")
    assert settings({"ACCELERATE_MIXED_PRECISION": "bf16"}) == ("bf16", 1, "ddp")
    assert settings({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}) == ("no", 4, "ddp")
    assert settings({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})[2] == "fsdp"
    # the recipe's values where accelerate was asked for nothing (its "no" / 1 defaults are not requests)
    assert settings({"ACCELERATE_MIXED_PRECISION": "no"}, mixed_precision="bf16", grad_accum_steps=2) == \
        ("bf16", 2, "ddp")  # fmt: skip
    assert settings({"ACCELERATE_MIXED_PRECISION": "bf16"}, mixed_precision="bf16") == ("bf16", 1, "ddp")


@pytest.mark.parametrize("environ, train, sentence", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {"mixed_precision": "no"},
     "train.mixed_precision is no but accelerate was launched with --mixed_precision bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, "accelerate asks for fp16 mixed precision; sCD trains in bf16"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, {"grad_accum_steps": 2},
     "train.grad_accum_steps is 2 but accelerate asks for 4"),
])  # fmt: skip
def test_a_contradiction_is_one_sentence(environ, train, sentence):
    with pytest.raises(UserError, match=sentence):
        settings(environ, **train)


def test_accelerates_mixed_precision_reaches_the_trainer(tiny_teacher, tmp_path, monkeypatch):
    """The trainer's Accelerator gets bf16 from ACCELERATE_MIXED_PRECISION (stopped there: CPU autocast in bf16 is
    not what the tests train in)."""
    made = []

    class Made(Exception):
        pass

    class Spy(trainer.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.mixed_precision)
            raise Made

    monkeypatch.setattr(trainer, "Accelerator", Spy)
    try:
        for asked in ("bf16", "no"):
            AcceleratorState._reset_state()  # one process, one precision: accelerate's state is a singleton
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", asked)
            with pytest.raises(Made):
                trainer.distill(tiny_config(tiny_teacher, tmp_path / "run", max_steps=1, convert_steps=0))
    finally:
        AcceleratorState._reset_state()
    assert made == ["bf16", "no"]
