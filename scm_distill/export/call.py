"""N images from a pipeline folder at a step count, whatever the pipeline conditions on.

`scm-distill sample`, `evaluate` and `bench` call exports (and, in `bench`, teacher pipelines) the one way every
export is called, `pipe(<inputs>, num_inference_steps=n, generator=...)`, reading how the pipeline takes inputs
from its `__call__` signature:
- unconditional (`batch_size=`): UNet2D students and DDPM/DDIM teachers;
- class-conditional (`class_labels=`): DiT and students of class-conditional networks of your own; labels are drawn
  uniformly from the seed;
- text-to-image (`prompt=`): SD, SDXL, SD3, Flux, Sana; prompts are required and used in order, cycling.
An export's description (contract.py) adds what its call needs besides the inputs (the size, where the pipeline's
default is not the distilled one) and its distilled guidance scale.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..families.base import images_to_uint8
from .contract import read_description
from .load import load_export
from .module_pipeline import READING_FILE, load_student

Conditioning = Literal["unconditional", "class", "text"]


def conditioning_of(pipe) -> Conditioning:
    """What a pipeline's call takes: its own `conditioning` (ModulePipeline, whose call takes either), else read from
    its signature."""
    if isinstance(getattr(pipe, "conditioning", None), str):
        return pipe.conditioning
    parameters = inspect.signature(pipe.__call__).parameters
    for name, kind in (("batch_size", "unconditional"), ("class_labels", "class"), ("prompt", "text")):
        if name in parameters:
            return kind
    raise UserError(f"{type(pipe).__name__} takes neither batch_size, class_labels nor prompt; it is not a "
                     f"pipeline scm-distill can sample.")  # fmt: skip


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Non-empty lines of a text file, one prompt each."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file '{path}' does not exist.")
    prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not prompts:
        raise UserError(f"prompts file '{path}' has no prompts (one per line).")
    return prompts


def module_network(network: str | nn.Module, trust_remote_code: bool) -> nn.Module:
    """The network a module export loads into: an nn.Module as given, or "FILE.py:NAME" - a class or function of
    that file called without arguments (it runs the file, so only with trust_remote_code)."""
    if isinstance(network, nn.Module):
        return network
    path, _, name = str(network).rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise UserError(f"--network must be FILE.py:NAME (a class or function there that returns your network when "
                        f"called without arguments), got '{network}'.")  # fmt: skip
    if not Path(path).is_file():
        raise UserError(f"--network file '{path}' does not exist.")
    if not trust_remote_code:
        raise UserError(f"--network runs the Python file '{path}'; pass --trust-remote-code (Python: "
                        f"trust_remote_code=True) if you trust it.")  # fmt: skip
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = getattr(module, name, None)
    made = made() if callable(made) else None
    if not isinstance(made, nn.Module):
        raise UserError(f"--network '{network}': {name} is not a class or function of '{path}' that returns an "
                        f"nn.Module.")  # fmt: skip
    return made


def load_pipeline(folder: Path, network: str | nn.Module | None, trust_remote_code: bool):
    """An export as its call takes it: a diffusers pipeline, or the ModulePipeline of your own network."""
    if not (folder / READING_FILE).is_file():
        return load_export(folder, trust_remote_code=trust_remote_code)
    if network is None:
        raise UserError(f"'{folder}' is the export of a student of your own network; name it: --network FILE.py:NAME "
                        f"(Python: network=YourNet()).")  # fmt: skip
    return load_student(folder, module_network(network, trust_remote_code))


class PipelineSampler:
    """`sampler(n, steps, seed, start)` -> uint8 images [n, C, H, W] from a pipeline folder.

    `start` is the index of the first image in a longer sequence: text pipelines take prompts[start:start + n]
    (cycling), so chunked generation uses every prompt in order. `default_prompt` stands in for missing prompts
    of a text pipeline (timing, where the prompt does not matter); other pipelines ignore it. `network`: the
    network a module export loads into (load_pipeline).
    """

    def __init__(self, folder: str | Path, prompts: tuple[str, ...] | None = None,
                 device: torch.device | None = None, default_prompt: str | None = None,
                 trust_remote_code: bool = False, network: str | nn.Module | None = None):  # fmt: skip
        self.folder = Path(folder)
        self.description = read_description(self.folder)
        self.pipe = load_pipeline(self.folder, network, trust_remote_code)
        if device is not None:
            self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.conditioning = conditioning_of(self.pipe)
        if self.conditioning == "text" and not prompts and default_prompt is not None:
            prompts = (default_prompt,)
        if self.conditioning == "text" and not prompts:
            raise UserError(f"'{self.folder}' is a text-to-image pipeline; give prompts (--prompts FILE, one per "
                             f"line).")  # fmt: skip
        if self.conditioning != "text" and prompts:
            raise UserError(f"'{self.folder}' is a {self.conditioning} pipeline and takes no prompts.")
        self.prompts = tuple(prompts or ())

    @property
    def guidance_scale(self) -> float | None:
        """The teacher's CFG scale the export's default call stands for (its distilled default, or the one scale a
        LoRA student distilled); None for unguided exports and folders without a description."""
        return self.description.cfg_scale if self.description is not None else None

    def call_kwargs(self, steps: int) -> dict:
        """Keyword arguments of the pipeline call for `steps` network evaluations (besides the inputs)."""
        extra = self.description.call_kwargs if self.description is not None else {}
        return {**extra, "num_inference_steps": steps}

    def inputs(self, n: int, seed: int, start: int) -> dict:
        if self.conditioning == "unconditional":
            return {"batch_size": n}
        if self.conditioning == "class":
            labels = torch.randint(0, self.num_classes, (n,), generator=torch.Generator().manual_seed(seed))
            return {"class_labels": labels.tolist()}
        return {"prompt": [self.prompts[(start + i) % len(self.prompts)] for i in range(n)]}

    @property
    def num_classes(self) -> int:
        """Labels 0..num_classes-1 of a class-conditional export: its description's, else DiT's label table."""
        if self.description is not None and self.description.num_classes:
            return self.description.num_classes
        return self.pipe.transformer.config.num_embeds_ada_norm

    def __call__(self, n: int, steps: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        out = self.pipe(**self.inputs(n, seed, start), **self.call_kwargs(steps), generator=generator,
                        output_type="np")  # fmt: skip
        return images_to_uint8(out.images)
