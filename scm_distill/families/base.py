"""The teacher interface: one adapter per model family, behind which the trainer never looks.

A `Teacher` owns a frozen `NativeModel` (its network read in TrigFlow), knows the space it works in (pixels or
latents), turns a data batch into (x0, condition), builds the student network, and builds the student's pipeline:
the diffusers pipeline an export holds. That one pipeline is both what the export writes and how the toolkit samples
a student (`student_images`), so exports reproduce the toolkit's samples by construction.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..parameterization import Condition, NativeModel, Prediction
from ..student import low_pass_time_embedding, student_model

if TYPE_CHECKING:
    from ..config import DistillConfig
    from ..export.contract import ExportDescription

Inputs = dict[str, Any]  # the pipeline call's inputs: {"batch_size": n} | {"class_labels": [...]} | {"prompt": [...]}


@dataclass(frozen=True)
class ExportInfo:
    """What the run tells an exporter: the sampler's requested times, the student's sigma_d and the card's facts."""

    sigma_data: float  # the student's TrigFlow sigma_d (measured on the latents for latent families)
    t_max: float  # requested TrigFlow times of the 2-step sampler (families snap them to what their scheduler holds)
    t_mid: float
    prediction: str = "v_prediction"  # how the student network's output is read
    base_model: str | None = None  # Hub id of the teacher (never a local path), for the card's metadata
    license: str | None = None  # licence of the export (the teacher's, inherited)
    card_facts: dict | None = None  # measured quality and speed, steps, run facts (rendered into README.md)
    sample_grid: Path | None = None  # PNG copied into the export and shown in the card


class Teacher(ABC):
    """A loaded teacher of one family. Subclasses set the class attributes and implement the hooks."""

    family: ClassVar[str]  # short name, e.g. "sd"
    description: ClassVar[str]  # one line for the list of supported families
    inputs_kind: ClassVar[str] = "batch_size"  # how its pipelines are called: batch_size | class_labels | prompt
    pipeline_tag: ClassVar[str | None] = "unconditional-image-generation"  # the Hub task of its exports

    model: NativeModel
    source: str  # what the user passed as --teacher
    folder: Path  # local folder of the pipeline

    @classmethod
    @abstractmethod
    def matches(cls, model_index: dict) -> bool:
        """Whether a pipeline's model_index.json belongs to this family (families are mutually exclusive)."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype, variant: str | None = None) -> Teacher:  # fmt: skip
        """Load the teacher's components from a local pipeline folder (`variant`: diffusers' weight variant,
        e.g. "fp16" for *.fp16.safetensors)."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one x0 in the space the consistency model works in, e.g. (C, H, W)."""

    @abstractmethod
    def check_data(self, images: Any) -> None:
        """Raise a one-sentence ValueError when a data set cannot feed this teacher."""

    def configure(self, config: DistillConfig) -> None:
        """Called once with the run's config before `prepare`: families read their sections (guidance, LoRA, latent
        cache) and raise one-sentence errors for settings the model cannot take, before anything is written."""
        if config.lora.rank:
            raise UserError(f"LoRA distillation is not supported for {self.family} teachers; set lora.rank 0.")

    def check_student(self, prediction: Prediction | None) -> None:
        """Called with the student's prediction before anything is written: raise a one-sentence error when this
        family cannot export such a student (default: every prediction exports)."""
        return None

    def prepare(self, images: Any) -> None:
        """Called once with the training data before training (checks it; latent families also measure sigma_d)."""
        self.check_data(images)

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """The student's network and how to read it; by default a trainable copy of the teacher's network."""
        return student_model(self.model, prediction, dropout)

    def low_pass_time_embedding(self, network: torch.nn.Module, max_frequency: float) -> int:
        """student.time_embedding_max_frequency on the student's network (default: a diffusers UNet's time_proj and
        time_embedding, student.low_pass_time_embedding); returns the channels removed."""
        return low_pass_time_embedding(network, max_frequency)

    @abstractmethod
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        """Data batch -> (x0 in the model's space [B, ...], condition); draw any randomness (e.g. guidance
        scales) from `generator`, which the trainer seeds per step."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """Samples in the model's space -> images in [-1, 1], [B, C, H, W]."""

    # --- sampling: pipeline inputs, the teacher's condition for them, the student's pipeline ------------------

    def sample_inputs(self, n: int, generator: torch.Generator) -> Inputs:
        """Pipeline inputs for n samples of sample grids and evaluations (unconditional: the batch size)."""
        return {"batch_size": n}

    def size_inputs(self) -> Inputs:
        """height / width for the call when the training resolution is not the pipeline's default size."""
        return {}

    def condition_for(self, inputs: Inputs) -> Condition:
        """The teacher's condition for pipeline inputs (guided families: at the distilled default scale)."""
        return {}

    def export_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """The student network as the export holds it (e.g. LoRA merged); by default the network itself."""
        return network

    @abstractmethod
    def student_pipeline(self, network: torch.nn.Module, info: ExportInfo):
        """The diffusers pipeline that samples with `network` (a student or its export network) in 1 or 2 steps:
        the teacher's components with the student and a consistency scheduler on the distilled times."""

    def call_overrides(self, network: torch.nn.Module) -> dict:
        """Call arguments the toolkit passes to sample a training-time network whose export needs none (e.g.
        guidance_scale 1 for an unmerged LoRA student of a CFG teacher)."""
        return {}

    @abstractmethod
    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        """The export's machine-readable description (export/contract.py), usually through `described`."""

    def described(self, info: ExportInfo, pipeline, trust_remote_code: bool, times: dict, network_times: dict,
                  more_steps: str, **fields) -> ExportDescription:  # fmt: skip
        """The description with what every family fills the same way (family, inputs, sigma_d, size, tag, Hub id,
        licence, facts); `fields` adds the family's own (guidance, classes)."""
        from ..export.contract import ExportDescription

        pipeline_name = pipeline if isinstance(pipeline, str) else type(pipeline).__name__
        fields = {"resolution": tuple(self.sample_shape[1:]), "call_kwargs": self.size_inputs(), **fields}
        return ExportDescription(family=self.family, pipeline=pipeline_name, inputs=self.inputs_kind,
                                 trust_remote_code=trust_remote_code, sigma_data=info.sigma_data, times=times,
                                 network_times=network_times, more_steps=more_steps, pipeline_tag=self.pipeline_tag,
                                 base_model=info.base_model, license=info.license, facts=info.card_facts or {},
                                 **fields)  # fmt: skip

    @torch.no_grad()
    def student_float_images(self, network: torch.nn.Module, info: ExportInfo, inputs: Inputs, steps: int,
                             generator: torch.Generator) -> Tensor:  # fmt: skip
        """Images [B, H, W, C] in [0, 1] (float) of the student's pipeline, as its export's `output_type="np"`."""
        pipe = self.student_pipeline(network, info)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(**inputs, **self.call_overrides(network), num_inference_steps=steps, generator=generator,
                   output_type="np").images  # fmt: skip
        return torch.as_tensor(np.ascontiguousarray(out))

    def student_images(self, network: torch.nn.Module, info: ExportInfo, inputs: Inputs, steps: int,
                       generator: torch.Generator) -> Tensor:  # fmt: skip
        """uint8 images [B, C, H, W] of the student's pipeline: exactly what its export gives for the same call."""
        return images_to_uint8(self.student_float_images(network, info, inputs, steps, generator))

    def lora_adapters(self, network: torch.nn.Module):
        """(pipeline class, component name) of the LoRA file written for the original teacher; None without LoRA."""
        return None


def images_to_uint8(images: np.ndarray | Tensor) -> Tensor:
    """A pipeline's np output [B, H, W, C] in [0, 1] (as an array or a tensor) -> uint8 [B, C, H, W]."""
    pixels = torch.as_tensor(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8)


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON.") from None


def component_class(model_index: dict, name: str) -> str | None:
    """Class name of a pipeline component ('unet': ['diffusers', 'UNet2DModel'] -> 'UNet2DModel')."""
    entry = model_index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def scheduler_class(model_index: dict) -> str | None:
    return component_class(model_index, "scheduler")
