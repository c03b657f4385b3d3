"""A user's own `nn.Module` as a teacher: a network predicting eps, v or x0 on a given schedule.

    teacher = ModuleTeacher(net, prediction="epsilon", alphas_cumprod=ac, sample_shape=(3, 32, 32))
    distill(config, teacher=teacher)                     # scm_distill.trainer.distill

Schedules: `alphas_cumprod` (a discrete VP schedule; the network takes the continuous timestep index) or
`sigmas` (an increasing VE/EDM noise table, x' = x0 + sigma eps; the network takes the index, sigma itself or
EDM's c_noise, see `time_input`). `data_range` is the range of the network's data (the data loader gives [-1, 1]);
sigma_d defaults to a quarter of its width (0.5 for [-1, 1], the paper's). The export is the student's weights with
the reading above, loaded by `scm_distill.load_student(folder, network=YourNet())` (export/module_pipeline.py).

Class-conditional networks (`num_classes`): the data's labels reach the network as `class_labels`, the student
learns the teacher read with classifier-free guidance at one scale `guidance_scale` against `null_class` (arXiv
2410.11081v2 Sec. 5.2 at a fixed s; the network has no guidance input, so the scale is distilled into the weights),
and the export is called with `class_labels=[...]`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import check_compatible
from ..errors import UserError
from ..export.contract import ExportDescription
from ..export.module_pipeline import ModulePipeline, module_times, network_inputs_call, plain_call, scaled_time
from ..guidance import GuidedModel, guidance_range
from ..parameterization import Condition, NetworkCall, Prediction, check_prediction, freeze
from ..processes import SigmaProcess, TimeInput, VPProcess
from ..student import TimeFeatures, low_pass_time_features
from .base import ExportInfo, Teacher


class ModuleTeacher(Teacher):
    """Args:
    network: the teacher network, called as `call(network, x_native, time, condition)`.
    prediction: "epsilon", "v_prediction" (VP schedules only) or "sample".
    sample_shape: shape of one sample, e.g. (C, H, W).
    alphas_cumprod: discrete VP schedule [T] (give this or `sigmas`).
    sigmas: increasing noise levels of a VE/EDM schedule (give this or `alphas_cumprod`).
    time_input: for `sigmas`: "index", "sigma" or "c_noise" (= log(sigma) / 4).
    time_scale: the network's time input is time_scale x that value (e.g. t = i / 1000 for a network that takes
        the timestep index i of a 1,000-step schedule as a fraction: 0.001); recorded in the export.
    data_range: (low, high) of the network's data (images arrive in [-1, 1] and are mapped onto it).
    sigma_d: TrigFlow data standard deviation (default: (high - low) / 4).
    call: how to feed the network (default `network(x, time, **condition)`).
    time_features: where the network embeds its time input (`TimeFeatures(layer, frequencies)`), needed only for
        student.time_embedding_max_frequency, which is then in rad per unit of the network's own time input.
    num_classes: a class-conditional network: labels 0..num_classes-1 reach it as `class_labels` (None: unconditional).
    null_class: the label of its unconditional branch (default num_classes), for classifier-free guidance.
    guidance_scale: the CFG scale s the student distills, u + s (c - u) (1: the conditional branch unguided).
    """

    family = "module"
    description = "your own nn.Module predicting eps, v or x0 on an alphas_cumprod or sigma schedule (Python API)"

    def __init__(self, network: nn.Module, *, prediction: Prediction, sample_shape: tuple[int, ...],
                 alphas_cumprod: Tensor | None = None, sigmas: Tensor | None = None, time_input: TimeInput = "sigma",
                 data_range: tuple[float, float] = (-1.0, 1.0), sigma_d: float | None = None,
                 call: NetworkCall = plain_call, name: str = "module",
                 time_features: TimeFeatures | None = None, time_scale: float = 1.0,
                 num_classes: int | None = None, null_class: int | None = None,
                 guidance_scale: float = 1.0):  # fmt: skip
        low, high = map(float, data_range)
        if not time_scale > 0:
            raise UserError(f"time_scale must be positive, got {time_scale}.")
        if not low < high:
            raise UserError(f"data_range must be (low, high) with low < high, got {data_range}.")
        self.data_range = (low, high)
        sigma_d = (high - low) / 4 if sigma_d is None else sigma_d
        if (alphas_cumprod is None) == (sigmas is None):
            raise UserError("give exactly one of alphas_cumprod (VP schedule) or sigmas (VE/EDM schedule).")
        if alphas_cumprod is not None:
            process, allowed = VPProcess(alphas_cumprod, sigma_d), ("epsilon", "v_prediction", "sample")
            self.schedule = {"alphas_cumprod": alphas_cumprod.double().tolist()}
        else:
            process, allowed = SigmaProcess(sigmas, sigma_d, time_input), ("epsilon", "sample")
            self.schedule = {"sigmas": sigmas.double().tolist(), "time_input": time_input}
        self.network, self.time_scale = freeze(network), float(time_scale)
        self.classes = class_settings(num_classes, null_class, guidance_scale)
        self.model = GuidedModel(network, process, check_prediction(prediction, allowed), sigma_d,
                                 network_inputs_call(scaled_time(call, self.time_scale)))  # fmt: skip
        self.call = call
        self._sample_shape = tuple(sample_shape)
        self.source, self.folder = name, Path(".")
        self.time_features = time_features

    @property
    def inputs_kind(self) -> str:
        return "class_labels" if self.classes else "batch_size"

    @property
    def pipeline_tag(self) -> str | None:
        return None if self.classes else "unconditional-image-generation"

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return False  # never picked from a pipeline folder; construct it in Python

    @classmethod
    def from_pretrained(cls, folder, source, sigma_d, device, dtype):
        raise NotImplementedError("ModuleTeacher is built in Python from your own network.")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def low_pass_time_embedding(self, network: nn.Module, max_frequency: float) -> int:
        if self.time_features is None:
            raise UserError("student.time_embedding_max_frequency needs to know where your network embeds its time: "
                            "pass ModuleTeacher(..., time_features=TimeFeatures(layer, frequencies)).")  # fmt: skip
        return low_pass_time_features(network, self.time_features, max_frequency)

    def check_data(self, images) -> None:
        check_compatible(images, self.sample_shape[0], tuple(self.sample_shape[1:]))
        if not self.classes:
            return
        if images.num_classes is None:
            raise UserError(f"the network is class-conditional (num_classes={self.classes['num_classes']}) but data "
                            f"'{images.name}' has no labels; pass (images, labels) or labelled data.")  # fmt: skip
        if images.num_classes > self.classes["num_classes"]:
            raise UserError(f"data '{images.name}' has {images.num_classes} classes but the network knows "
                            f"{self.classes['num_classes']} (ModuleTeacher(num_classes=...)).")  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        low, high = self.data_range
        x0 = low + (batch["image"].to(self.device, torch.float32) + 1) / 2 * (high - low)
        return x0, self.condition_for({"class_labels": batch["label"]} if self.classes else {})

    def sample_inputs(self, n: int, generator: torch.Generator) -> dict:
        if not self.classes:
            return {"batch_size": n}
        return {"class_labels": torch.randint(0, self.classes["num_classes"], (n,), generator=generator).tolist()}

    def condition_for(self, inputs: dict) -> Condition:
        """The labels as `class_labels`, with CFG's unconditional branch at the distilled scale when it guides."""
        if not self.classes or "class_labels" not in inputs:
            return {}
        return class_condition(inputs["class_labels"], self.classes, self.device)

    def decode(self, x0: Tensor) -> Tensor:
        low, high = self.data_range
        return (x0 - low) / (high - low) * 2 - 1

    @property
    def stated(self) -> dict:
        """What the user stated about the network besides its weights (part of the run's resume fingerprint)."""
        return {"teacher_prediction": self.model.prediction, "teacher_sigma_data": self.model.sigma_d,
                "sample_shape": list(self.sample_shape), "data_range": list(self.data_range),
                "time_scale": self.time_scale, **self.schedule, **({"classes": self.classes} if self.classes else {})}

    def reading(self, info: ExportInfo) -> dict:
        """How the export reads its weights (export/module_pipeline.py)."""
        stated = {k: v for k, v in self.stated.items() if not k.startswith("teacher_")}
        return {"prediction": info.prediction, "sigma_data": info.sigma_data, "times": [info.t_max, info.t_mid],
                **stated}

    def student_pipeline(self, network: nn.Module, info: ExportInfo) -> ModulePipeline:
        return ModulePipeline(network, self.reading(info), self.call)

    def describe(self, pipeline: ModulePipeline, info: ExportInfo) -> ExportDescription:
        times = module_times(pipeline.reading)
        classes = {} if not self.classes else {
            "num_classes": self.classes["num_classes"], "cfg_scale": self.classes["guidance_scale"],
            "guidance_note": f"CFG at s = {self.classes['guidance_scale']} against class {self.classes['null_class']} "
                             f"distilled into the weights"}  # fmt: skip
        return self.described(info, "scm_distill.ModulePipeline", False, times, times,
                              "more steps take an even grid in TrigFlow time from t_max (multistep consistency "
                              "sampling; not distilled)", **classes)  # fmt: skip


def class_settings(num_classes: int | None, null_class: int | None, guidance_scale: float) -> dict | None:
    """The checked class conditioning of a ModuleTeacher (None: unconditional)."""
    if num_classes is None:
        if null_class is not None or guidance_scale != 1.0:
            raise UserError("null_class and guidance_scale need a class-conditional network: pass num_classes too.")
        return None
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    null_class = num_classes if null_class is None else null_class
    if not isinstance(null_class, int) or 0 <= null_class < num_classes:
        raise UserError(f"null_class must be an integer label outside the classes 0..{num_classes - 1}, got "
                        f"{null_class!r}.")  # fmt: skip
    guidance_range(float(guidance_scale), float(guidance_scale))  # at least 1 and finite
    return {"num_classes": num_classes, "null_class": null_class, "guidance_scale": float(guidance_scale)}


def class_condition(labels, classes: dict, device: torch.device) -> Condition:
    """`class_labels` [B] and, for s > 1, CFG's branch on the null class at s (guidance.py's guided condition)."""
    labels = torch.as_tensor(labels).reshape(-1).to(device, torch.int64)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes["num_classes"]):
        raise UserError(f"class labels must lie in 0..{classes['num_classes'] - 1}, got {labels.tolist()[:8]}.")
    condition = {"class_labels": labels}
    if classes["guidance_scale"] == 1.0:
        return condition
    return {**condition, "uncond": {"class_labels": torch.full_like(labels, classes["null_class"])},
            "guidance_scale": torch.full(labels.shape, classes["guidance_scale"], device=device)}
