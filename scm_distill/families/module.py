"""A user's own `nn.Module` as a teacher: a network predicting eps, v or x0 on a given schedule.

    teacher = ModuleTeacher(net, prediction="epsilon", alphas_cumprod=ac, sample_shape=(3, 32, 32))
    distill(config, teacher=teacher)                     # scm_distill.trainer.distill

Schedules: `alphas_cumprod` (a discrete VP schedule; the network takes the continuous timestep index) or
`sigmas` (an increasing VE/EDM noise table, x' = x0 + sigma eps; the network takes the index, sigma itself or
EDM's c_noise, see `time_input`). The export writes the student's weights as safetensors with a JSON that says
how to read them (diffusers models are saved with `save_pretrained` instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data import check_compatible
from ..export.card import write_model_card
from ..parameterization import Condition, NativeModel, NetworkCall, Prediction, check_prediction, freeze
from ..processes import SigmaProcess, TimeInput, VPProcess
from .base import ExportInfo, Teacher


def plain_call(network: nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """net(x, time, **condition)."""
    return network(x, time, **condition)


class ModuleTeacher(Teacher):
    """Args:
    network: the teacher network, called as `call(network, x_native, time, condition)`.
    prediction: "epsilon", "v_prediction" (VP schedules only) or "sample".
    sample_shape: shape of one sample, e.g. (C, H, W).
    alphas_cumprod: discrete VP schedule [T] (give this or `sigmas`).
    sigmas: increasing noise levels of a VE/EDM schedule (give this or `alphas_cumprod`).
    time_input: for `sigmas`: "index", "sigma" or "c_noise" (= log(sigma) / 4).
    sigma_d: TrigFlow data standard deviation.
    call: how to feed the network (default `network(x, time, **condition)`).
    """

    family = "module"
    description = "your own nn.Module predicting eps, v or x0 on an alphas_cumprod or sigma schedule (Python API)"

    def __init__(self, network: nn.Module, *, prediction: Prediction, sample_shape: tuple[int, ...],
                 alphas_cumprod: Tensor | None = None, sigmas: Tensor | None = None, time_input: TimeInput = "sigma",
                 sigma_d: float = 0.5, call: NetworkCall = plain_call, name: str = "module"):  # fmt: skip
        if (alphas_cumprod is None) == (sigmas is None):
            raise ValueError("give exactly one of alphas_cumprod (VP schedule) or sigmas (VE/EDM schedule).")
        if alphas_cumprod is not None:
            process, allowed = VPProcess(alphas_cumprod, sigma_d), ("epsilon", "v_prediction", "sample")
            self.schedule = {"alphas_cumprod": alphas_cumprod.double().tolist()}
        else:
            process, allowed = SigmaProcess(sigmas, sigma_d, time_input), ("epsilon", "sample")
            self.schedule = {"sigmas": sigmas.double().tolist(), "time_input": time_input}
        self.network = freeze(network)
        self.model = NativeModel(network, process, check_prediction(prediction, allowed), sigma_d, call)
        self._sample_shape = tuple(sample_shape)
        self.source, self.folder = name, Path(".")

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return False  # never picked from a pipeline folder; construct it in Python

    @classmethod
    def from_pretrained(cls, folder, source, sigma_d, device, dtype):
        raise NotImplementedError("ModuleTeacher is built in Python from your own network.")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def check_data(self, images) -> None:
        check_compatible(images, self.sample_shape[0], tuple(self.sample_shape[1:]))

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        device = next(self.network.parameters()).device
        return batch["image"].to(device, torch.float32), {}

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        return {}

    def export(self, network: nn.Module, folder: Path, info: ExportInfo) -> None:
        if hasattr(network, "save_pretrained"):
            network.save_pretrained(folder / "student", safe_serialization=True)
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                      folder / "student.safetensors")  # fmt: skip
        reading = {"prediction": info.prediction, "sigma_data": info.sigma_data, "t_max": info.t_max,
                   "t_mid": info.t_mid, **self.schedule}  # fmt: skip
        (folder / "scm_student.json").write_text(json.dumps(reading) + "\n")
        usage = ("# Load the weights into your own network class, then sample with\n"
                 "# scm_distill.generate.consistency_samples (see scm_student.json for t_max, t_mid).")  # fmt: skip
        write_model_card(folder, info, usage=usage, pipeline_tag="unconditional-image-generation")
