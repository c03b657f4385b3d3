"""The one machine-readable description of an export: `scm_distill.json` next to model_index.json.

Every export is called the same way, `DiffusionPipeline.from_pretrained(path)` then
`pipe(<inputs>, num_inference_steps=2)`; nothing here is needed to call it. The description says what the export
is (family, pipeline, inputs, the distilled guidance default and range, the sampler's times, sigma_d, whether it
ships code, the teacher's Hub id and licence, where the LoRA adapters are) for the model card and for `scm-distill
sample / evaluate / bench`. One writer (`write_description`) and one reader (`read_description`); a folder that
lacks the file (e.g. re-saved by diffusers, which keeps only what it knows) is still sampled through its call.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import UserError

DESCRIPTION_FILE = "scm_distill.json"
FORMAT_VERSION = 1
LORA_FOLDER = "lora"  # subfolder of the adapters for the original teacher (load_lora_weights(path, subfolder=...))


@dataclass(frozen=True)
class ExportDescription:
    family: str  # the teacher family, e.g. "sd"
    pipeline: str  # the pipeline class `from_pretrained` returns
    inputs: str  # what its call takes: "batch_size", "class_labels" or "prompt"
    trust_remote_code: bool  # whether the folder ships code (loads only with trust_remote_code=True)
    sigma_data: float  # the student's TrigFlow sigma_d
    times: dict[str, list[float]]  # "1" / "2": TrigFlow times of the 1- and 2-step samplers
    network_times: dict[str, list[float]]  # "1" / "2": what the scheduler feeds (timesteps, flow times or sigmas)
    more_steps: str  # what num_inference_steps > 2 does
    requested_times: tuple[float, float] | None = None  # (t_max, t_mid) the run asked for (families whose scheduler
    # holds only some times, the VP ones, snap them to the nearest pair on its grid: `times`)
    guidance_scale: float | None = None  # the call's default guidance scale (None: the call takes no scale)
    guidance_range: tuple[float, float] | None = None  # the scales the student was distilled on
    cfg_scale: float | None = None  # the teacher's CFG scale the default call stands for (also for LoRA students
    # with CFG distilled into their weights, whose call takes no scale)
    guidance_note: str = ""  # one sentence on guidance for the card
    resolution: tuple[int, int] | None = None  # (height, width) the student was distilled at
    call_kwargs: dict = field(default_factory=dict)  # what the call needs besides its inputs (height / width when
    # the pipeline's default size is not the distilled one)
    num_classes: int | None = None  # class-conditional exports: labels 0..num_classes-1
    pipeline_tag: str | None = "unconditional-image-generation"  # None: no Hub task fits (class-conditional)
    base_model: str | None = None  # the teacher's Hub id (never a local path)
    license: str | None = None
    lora: str | None = None  # subfolder of the adapters for the original teacher
    facts: dict = field(default_factory=dict)  # measured quality and speed, run facts
    scm_distill: str = __version__
    format_version: int = FORMAT_VERSION


def description_text(description: ExportDescription) -> str:
    return json.dumps(dataclasses.asdict(description), indent=2, sort_keys=True) + "\n"


def write_description(folder: Path, description: ExportDescription) -> Path:
    path = Path(folder) / DESCRIPTION_FILE
    path.write_text(description_text(description))
    return path


def read_description(folder: str | Path) -> ExportDescription | None:
    """The description of an export folder, or None when it has none (one-sentence error when it is damaged)."""
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON.") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"'{path}' has format version {data.get('format_version')}, this scm-distill reads "
                         f"{FORMAT_VERSION}.")  # fmt: skip
    known = {f.name for f in dataclasses.fields(ExportDescription)}
    data = {k: v for k, v in data.items() if k in known}
    for key in ("guidance_range", "resolution", "requested_times"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return ExportDescription(**data)


def example_inputs(description: ExportDescription) -> str:
    """The inputs of the model card's call."""
    extra = "".join(f", {key}={value!r}" for key, value in description.call_kwargs.items())
    if description.inputs == "prompt":
        return f'"a photo of a cat"{extra}'
    if description.inputs == "class_labels":
        return f"class_labels={list(range(min(4, description.num_classes or 4)))}{extra}"
    return f"batch_size=4{extra}"


def usage(description: ExportDescription, repo_id: str = "PATH_OR_REPO_ID") -> str:
    """The one call of every export, as the model card shows it."""
    if description.family == "module":
        return f"""import torch
from scm_distill import load_student

pipe = load_student("{repo_id}", network=YourNetwork())  # an instance of the network class you distilled
generator = torch.Generator().manual_seed(0)
images = pipe({example_inputs(description)}, num_inference_steps=2, generator=generator).images"""
    trust = ", trust_remote_code=True" if description.trust_remote_code else ""
    text = f"""import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}"{trust})  # {description.pipeline}
generator = torch.Generator().manual_seed(0)
images = pipe({example_inputs(description)}, num_inference_steps=2, generator=generator).images
images[0].save("sample.png")"""
    if description.lora and description.base_model:
        text += f"""

# or: the LoRA on the original teacher ({description.guidance_note})
pipe = DiffusionPipeline.from_pretrained("{description.base_model}")
pipe.load_lora_weights("{repo_id}", subfolder="{description.lora}")"""
    return text
