"""The teacher interface: one adapter per model family, behind which the trainer never looks.

A `Teacher` owns a frozen `NativeModel` (its network read in TrigFlow), knows the shape of the space it works
in (pixels or latents), turns a data batch into (x0, condition), decodes samples to images, and exports a
trained student network as a pipeline folder of its own family.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .. import generate
from ..parameterization import Condition, NativeModel, Prediction
from ..student import student_model

if TYPE_CHECKING:
    from ..config import DistillConfig


@dataclass(frozen=True)
class ExportInfo:
    """What an exporter writes next to the weights: the sampler's schedule and the model card's facts."""

    sigma_data: float
    t_max: float
    t_mid: float
    base_model: str  # Hub id or path of the teacher
    card_facts: dict  # measured quality and speed, steps, run facts (rendered into README.md)
    prediction: str = "v_prediction"  # how the exported student network's output is read
    sample_grid: Path | None = None  # PNG copied into the export and shown in the card


class Teacher(ABC):
    """A loaded teacher of one family. Subclasses set `family` and `description` and implement the hooks."""

    family: ClassVar[str]  # short name, e.g. "unet2d-vp"
    description: ClassVar[str]  # one line for the list of supported families

    model: NativeModel
    source: str  # what the user passed as --teacher
    folder: Path  # local folder of the pipeline

    @classmethod
    @abstractmethod
    def matches(cls, model_index: dict) -> bool:
        """Whether a pipeline's model_index.json belongs to this family."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype) -> Teacher:  # fmt: skip
        """Load the teacher's components from a local pipeline folder."""

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
            raise ValueError(f"LoRA distillation is not supported for {self.family} teachers; set lora.rank 0.")

    def check_student(self, prediction: Prediction) -> None:
        """Called with the student's prediction before anything is written: raise a one-sentence error when this
        family cannot export such a student (default: every prediction exports)."""
        return None

    def prepare(self, images: Any) -> None:
        """Called once with the training data before training (checks it; families may also measure sigma_d
        or build caches here)."""
        self.check_data(images)

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """The student's network and how to read it; by default a trainable copy of the teacher's network.
        Families override this to add inputs (e.g. a zero-initialised guidance embedding) or LoRA adapters;
        the trainer optimises only parameters with requires_grad."""
        return student_model(self.model, prediction, dropout)

    @abstractmethod
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        """Data batch -> (x0 in the model's space [B, ...], condition); draw any randomness (e.g. guidance
        scales) from `generator`, which the trainer seeds per step."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """Samples in the model's space -> images in [-1, 1], [B, C, H, W]."""

    def consistency_samples(self, model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float,
                            t_mid: float, generator, condition: Condition | None = None,
                            device=None) -> Tensor:  # fmt: skip
        """The toolkit's consistency sampler for this family (x0 in the model's space); families whose export samples
        in another form (e.g. a stock scheduler on integer timesteps) override it to match their export exactly."""
        return generate.consistency_samples(model, shape, num_steps, t_max, t_mid, generator, condition, device)

    @abstractmethod
    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        """Condition for unconditional/class-conditional sample grids and evaluation."""

    def prompt_condition(self, prompts: list[str]) -> Condition:
        """Condition for sampling with these prompts (evaluation with --prompts); text-to-image families override
        it."""
        raise ValueError(f"teacher '{self.source}' is not a text-to-image model; it takes no prompts.")

    @abstractmethod
    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        """Write a pipeline folder (into an empty `folder`) that samples with the student in 2 steps."""


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"'{path}' is not valid JSON.") from None


def component_class(model_index: dict, name: str) -> str | None:
    """Class name of a pipeline component ('unet': ['diffusers', 'UNet2DModel'] -> 'UNet2DModel')."""
    entry = model_index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None
