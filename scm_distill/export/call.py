"""N images from a pipeline folder at a step count, whatever the pipeline conditions on.

`scm-distill sample`, `evaluate` and `bench` call exports (and, in `bench`, teacher pipelines) through
`PipelineSampler`, which reads how the pipeline is called from its `__call__` signature:
- unconditional (`batch_size=`): UNet2D students and DDPM/DDIM teachers;
- class-conditional (`class_labels=`): DiT; labels are drawn uniformly from the seed;
- text-to-image (`prompt=`): SD, SDXL, SD3, Flux, Sana; prompts are required and used in order, cycling.

Exports of stock pipelines carry the exact 1- and 2-step calls in `scm_call.json` (timesteps or sigmas, guidance,
size): those are used for 1 and 2 steps; other step counts are the stock scheduler's own schedule. Stock flow
pipelines draw the re-noising noise from torch's global generator, so every call runs with it seeded (and
restored afterwards).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Literal

import torch

from .load import load_export

CALL_FILE = "scm_call.json"  # written by the SD and flow families next to model_index.json
Conditioning = Literal["unconditional", "class", "text"]
CALL_KEYS = {1: "1_step", 2: "2_steps"}
SCHEDULE_KEYS = ("timesteps", "sigmas")  # the call file's schedule; other step counts use the scheduler's own


def conditioning_of(pipe) -> Conditioning:
    """What a pipeline's call takes, from its signature."""
    parameters = inspect.signature(pipe.__call__).parameters
    for name, kind in (("batch_size", "unconditional"), ("class_labels", "class"), ("prompt", "text")):
        if name in parameters:
            return kind
    raise ValueError(f"{type(pipe).__name__} takes neither batch_size, class_labels nor prompt; it is not a "
                     f"pipeline scm-distill can sample.")  # fmt: skip


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Non-empty lines of a text file, one prompt each."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file '{path}' does not exist.")
    prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"prompts file '{path}' has no prompts (one per line).")
    return prompts


class PipelineSampler:
    """`sampler(n, steps, seed, start)` -> uint8 images [n, C, H, W] from a pipeline folder.

    `start` is the index of the first image in a longer sequence: text pipelines take prompts[start:start + n]
    (cycling), so chunked generation uses every prompt in order. `default_prompt` stands in for missing prompts
    of a text pipeline (timing, where the prompt does not matter); other pipelines ignore it.
    """

    def __init__(self, folder: str | Path, prompts: tuple[str, ...] | None = None,
                 device: torch.device | None = None, default_prompt: str | None = None,
                 trust_remote_code: bool = False):  # fmt: skip
        self.folder = Path(folder)
        self.pipe = load_export(self.folder, trust_remote_code=trust_remote_code)
        if device is not None:
            self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.conditioning = conditioning_of(self.pipe)
        if self.conditioning == "text" and not prompts and default_prompt is not None:
            prompts = (default_prompt,)
        if self.conditioning == "text" and not prompts:
            raise ValueError(f"'{self.folder}' is a text-to-image pipeline; give prompts (--prompts FILE, one per "
                             f"line).")  # fmt: skip
        if self.conditioning != "text" and prompts:
            raise ValueError(f"'{self.folder}' is a {self.conditioning} pipeline and takes no prompts.")
        self.prompts = tuple(prompts or ())
        call_file = self.folder / CALL_FILE
        self.calls = json.loads(call_file.read_text()) if call_file.is_file() else None

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the default 2-step call (scm_call.json, or the config of an export with its own
        pipeline file); None for pipelines without one. A LoRA student with CFG merged into its weights is called
        at 1."""
        if self.calls is not None:
            return self.calls["2_steps"].get("guidance_scale")
        return self.pipe.config.get("guidance_scale")

    def call_kwargs(self, steps: int) -> dict:
        """Keyword arguments of the pipeline call for `steps` network evaluations (besides the inputs)."""
        if self.calls is None:
            return {"num_inference_steps": steps}
        if steps in CALL_KEYS:
            return dict(self.calls[CALL_KEYS[steps]])
        general = {k: v for k, v in self.calls["2_steps"].items() if k not in SCHEDULE_KEYS}
        return {**general, "num_inference_steps": steps}

    def inputs(self, n: int, seed: int, start: int) -> dict:
        if self.conditioning == "unconditional":
            return {"batch_size": n}
        if self.conditioning == "class":
            classes = self.pipe.transformer.config.num_embeds_ada_norm
            labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
            return {"class_labels": labels.tolist()}
        return {"prompt": [self.prompts[(start + i) % len(self.prompts)] for i in range(n)]}

    def __call__(self, n: int, steps: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        device = self.pipe.device
        kwargs = {**self.inputs(n, seed, start), **self.call_kwargs(steps)}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            images = self.pipe(**kwargs, generator=torch.Generator(device).manual_seed(seed), output_type="pt").images
        return (images.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
