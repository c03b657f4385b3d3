"""A user's own `nn.Module` as a teacher: a network predicting eps, v or x0 on a given schedule.

    teacher = ModuleTeacher(net, prediction="epsilon", alphas_cumprod=ac, sample_shape=(3, 32, 32))
    distill(config, teacher=teacher)                     # scm_distill.trainer.distill

Schedules: `alphas_cumprod` (a discrete VP schedule; the network takes the continuous timestep index) or
`sigmas` (an increasing VE/EDM noise table, x' = x0 + sigma eps; the network takes the index, sigma itself or
EDM's c_noise, see `time_input`). `data_range` is the range of the network's data (the data loader gives [-1, 1]);
sigma_d defaults to a quarter of its width (0.5 for [-1, 1], the paper's). The export is the student's weights with
the reading above, loaded by `scm_distill.load_student(folder, network=YourNet())` (export/module_pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import check_compatible
from ..errors import UserError
from ..export.contract import ExportDescription
from ..export.module_pipeline import ModulePipeline, module_times, plain_call, scaled_time
from ..parameterization import Condition, NativeModel, NetworkCall, Prediction, check_prediction, freeze
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
    """

    family = "module"
    description = "your own nn.Module predicting eps, v or x0 on an alphas_cumprod or sigma schedule (Python API)"

    def __init__(self, network: nn.Module, *, prediction: Prediction, sample_shape: tuple[int, ...],
                 alphas_cumprod: Tensor | None = None, sigmas: Tensor | None = None, time_input: TimeInput = "sigma",
                 data_range: tuple[float, float] = (-1.0, 1.0), sigma_d: float | None = None,
                 call: NetworkCall = plain_call, name: str = "module",
                 time_features: TimeFeatures | None = None, time_scale: float = 1.0):  # fmt: skip
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
        self.model = NativeModel(network, process, check_prediction(prediction, allowed), sigma_d,
                                 scaled_time(call, self.time_scale))  # fmt: skip
        self.call = call
        self._sample_shape = tuple(sample_shape)
        self.source, self.folder = name, Path(".")
        self.time_features = time_features

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

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        device = next(self.network.parameters()).device
        low, high = self.data_range
        return low + (batch["image"].to(device, torch.float32) + 1) / 2 * (high - low), {}

    def decode(self, x0: Tensor) -> Tensor:
        low, high = self.data_range
        return (x0 - low) / (high - low) * 2 - 1

    def reading(self, info: ExportInfo) -> dict:
        """How the export reads its weights (export/module_pipeline.py)."""
        return {"prediction": info.prediction, "sigma_data": info.sigma_data, "times": [info.t_max, info.t_mid],
                "sample_shape": list(self.sample_shape), "data_range": list(self.data_range),
                "time_scale": self.time_scale, **self.schedule}

    def student_pipeline(self, network: nn.Module, info: ExportInfo) -> ModulePipeline:
        return ModulePipeline(network, self.reading(info), self.call)

    def describe(self, pipeline: ModulePipeline, info: ExportInfo) -> ExportDescription:
        times = module_times(pipeline.reading)
        return self.described(info, "scm_distill.ModulePipeline", False, times, times,
                              "more steps take an even grid in TrigFlow time from t_max (multistep consistency "
                              "sampling; not distilled)")  # fmt: skip
