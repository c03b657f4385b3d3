"""Every export form on a tiny random-config teacher: 2 distillation steps, then the export (shared by the export
contract tests and the generic pipeline checks; built once per test session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import save_tiny_pipeline
from tiny_pipelines import save_captioned_images, save_class_images, save_tiny

# form -> (tiny teacher, LoRA rank); the teacher "unet2d" is conftest's DDPMPipeline on the 8x8 digits
FORMS = {
    "unet2d": ("unet2d", 0), "sd": ("sd", 0), "sd-lora": ("sd", 4), "sdxl": ("sdxl", 0), "dit": ("dit", 0),
    "sd3": ("sd3", 0), "sd3-lora": ("sd3", 4), "flux": ("flux", 0), "flux-schnell": ("flux-schnell", 0),
    "sana": ("sana", 0), "edm": ("edm", 0), "edm-lora": ("edm", 4),
}  # fmt: skip
PROMPTS = ["a red square", "two dots"]
GUIDANCE = {"sd": {"s_max": 8.0}, "sdxl": {"s_max": 6.0}, "edm": {"s_max": 6.0}, "flux": {"s_max": 4.0}}


@dataclass
class Export:
    form: str
    teacher_dir: Path
    folder: Path
    teacher: object  # the Teacher the run trained with
    result: object  # DistillResult
    config: object

    @property
    def inputs(self) -> dict:
        kind = self.teacher.inputs_kind
        if kind == "prompt":
            return {"prompt": list(PROMPTS), **self.teacher.size_inputs()}
        if kind == "class_labels":
            return {"class_labels": [0, 2]}
        return {"batch_size": 2}

    def network(self) -> torch.nn.Module:
        """The export's network: the EMA student as the export holds it (LoRA merged)."""
        return self.teacher.export_network(self.result.ema.network)


def build_export(form: str, root: Path) -> Export:
    from scm_distill.config import resolve
    from scm_distill.families import load_teacher
    from scm_distill.trainer import distill

    name, rank = FORMS[form]
    root.mkdir(parents=True, exist_ok=True)
    if name == "unet2d":
        teacher_dir, data = save_tiny_pipeline(root / "teacher"), "digits"
    else:
        teacher_dir = save_tiny(name, root / "teacher")
        data = str(save_class_images(root / "data") if name == "dit" else save_captioned_images(root / "data"))
    family = name.split("-")[0]
    config = resolve(cli={"teacher": str(teacher_dir), "output": str(root / "run"), "data": {"spec": data},
                          "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                    "checkpoint_every": 0},
                          "sampling": {"teacher_steps": 2, "grid_size": 2},
                          "guidance": {"embedding_dim": 32, **GUIDANCE.get(family, {})},
                          "lora": {"rank": rank}})  # fmt: skip
    teacher = load_teacher(str(teacher_dir))
    result = distill(config, teacher=teacher)
    return Export(form, teacher_dir, result.export_dir, teacher, result, config)
