"""The export of a student of your own `nn.Module`: a small pipeline that takes your network class.

    from scm_distill import load_student
    pipe = load_student("runs/mine/pipeline", network=MyNet())         # loads student.safetensors into MyNet()
    images = pipe(batch_size=16, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=2).images  # a class-conditional network

The folder holds the student's weights (`student.safetensors`, the state dict of your network class), its reading
(`scm_reading.json`: prediction type, schedule, time input and its scale, data range, sigma_d and the sampler's
times), the
description and the model card. Sampling is the toolkit's own consistency sampler (sampling.py, arXiv 2410.11081v2
Sec. 5.2) on the network read in TrigFlow (parameterization.py), so the export and the toolkit are one code path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import check_state_dict
from ..errors import UserError
from ..guidance import network_inputs
from ..parameterization import NativeModel, NetworkCall
from ..processes import SigmaProcess, VPProcess
from ..trigflow import consistency_times

WEIGHTS_FILE, READING_FILE = "student.safetensors", "scm_reading.json"


@dataclass
class ModuleOutput:
    images: np.ndarray | torch.Tensor  # [B, H, W, C] in [0, 1] ("np") or [B, C, H, W] ("pt")


def plain_call(network: nn.Module, x, time, condition):
    """net(x, time, **condition)."""
    return network(x, time, **condition)


def network_inputs_call(call: NetworkCall) -> NetworkCall:
    """A call that feeds the network only its inputs, not CFG's branch and scale (guidance.GUIDANCE_KEYS)."""

    def inputs_only(network: nn.Module, x, time, condition):
        return call(network, x, time, network_inputs(condition))

    return inputs_only


def scaled_time(call: NetworkCall, time_scale: float) -> NetworkCall:
    """A call that feeds the network time_scale x the process's time input (e.g. t = i / 1000: 0.001)."""
    if time_scale == 1.0:
        return call

    def scaled(network: nn.Module, x, time, condition):
        return call(network, x, time * time_scale, condition)

    return scaled


def reading_process(reading: dict):
    """The schedule of a reading: a VP alphas_cumprod table or an increasing sigma table."""
    sigma_d = reading["sigma_data"]
    if "alphas_cumprod" in reading:
        return VPProcess(torch.tensor(reading["alphas_cumprod"], dtype=torch.float64), sigma_d)
    return SigmaProcess(torch.tensor(reading["sigmas"], dtype=torch.float64), sigma_d, reading["time_input"])


class ModulePipeline:
    """`pipe(batch_size, num_inference_steps=2, generator=None, output_type="np")` on a network of your class;
    a class-conditional one (reading["classes"]) is called with `class_labels=[...]` instead of batch_size."""

    def __init__(self, network: nn.Module, reading: dict, call: NetworkCall = plain_call):
        self.network, self.reading = network, reading
        self.model = NativeModel(network, reading_process(reading), reading["prediction"], reading["sigma_data"],
                                 scaled_time(call, reading.get("time_scale", 1.0)))  # fmt: skip

    @property
    def conditioning(self) -> str:
        """What the call takes (export/call.py): "class" (class_labels) or "unconditional" (batch_size)."""
        return "class" if self.reading.get("classes") else "unconditional"

    def condition(self, batch_size: int | None, class_labels) -> tuple[int, dict]:
        """(batch size, the network's condition) of a call, checked against the reading."""
        classes = self.reading.get("classes")
        if classes is None:
            if class_labels is not None:
                raise UserError("this student's network is unconditional; call it with batch_size, not class_labels.")
            return (1 if batch_size is None else batch_size), {}
        if class_labels is None or batch_size is not None:
            raise UserError(f"this student is class-conditional; call it with class_labels (0..."
                            f"{classes['num_classes'] - 1}), not batch_size.")  # fmt: skip
        labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
        if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= classes["num_classes"]:
            raise UserError(f"class_labels must be a non-empty list of labels in 0..{classes['num_classes'] - 1}.")
        return len(labels), {"class_labels": labels.to(self.device)}

    def set_progress_bar_config(self, **kwargs) -> None:
        """Nothing to show: one or two network calls."""

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device) -> ModulePipeline:
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, num_inference_steps: int = 2, generator=None,
                 output_type: str = "np", return_dict: bool = True, class_labels=None):  # fmt: skip
        from ..generate import consistency_samples

        t_max, t_mid = self.reading["times"]
        n, condition = self.condition(batch_size, class_labels)
        x0 = consistency_samples(self.model, (n, *self.reading["sample_shape"]), num_inference_steps, t_max, t_mid,
                                 generator, condition, device=self.device)  # fmt: skip
        low, high = self.reading["data_range"]
        images = ((x0.float() - low) / (high - low)).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
        return ModuleOutput(images) if return_dict else (images,)

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        folder = Path(folder)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(weights, folder / WEIGHTS_FILE)
        (folder / READING_FILE).write_text(json.dumps(self.reading, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, folder, network: nn.Module, call: NetworkCall = plain_call) -> ModulePipeline:
        folder = Path(folder)
        if not (folder / READING_FILE).is_file():
            raise UserError(f"'{folder}' is not the export of a module student (no {READING_FILE}).")
        weights = load_file(folder / WEIGHTS_FILE)
        check_state_dict(weights, network.state_dict(), f"the student weights in '{folder}'")
        network.load_state_dict(weights)
        return cls(network.eval(), json.loads((folder / READING_FILE).read_text()), call)


def load_student(folder: str | Path, network: nn.Module, call: NetworkCall = plain_call) -> ModulePipeline:
    """The exported student of a module teacher, loaded into `network` (an instance of your network class)."""
    return ModulePipeline.from_pretrained(folder, network, call)


def module_times(reading: dict) -> dict:
    t_max, t_mid = reading["times"]
    return {str(n): consistency_times(n, t_max, t_mid) for n in (1, 2)}
