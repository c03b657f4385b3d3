"""Sana teachers (`SanaPipeline`): a linear-attention flow-matching transformer on deep-compression (DC-AE) latents.

Conditions as the pipeline's `encode_prompt` builds them: Gemma states and their attention mask, prompts prefixed
with the pipeline's own default instruction (`complex_human_instruction`); CFG's unconditional branch is the
negative prompt without it, as in the pipeline. The network time is 1000 s x `timestep_scale` (what SanaPipeline
feeds); Sana's default scheduler (DPM-Solver on flow sigmas) is accepted like FlowMatchEulerDiscreteScheduler.

Student: the transformer plus a zero-initialised guidance embedding added to its time embedding `time_embed.emb`
(guidance_inputs.py); a LoRA student carries the same input at zero (CFG distilled at one scale). A teacher that
already takes a guidance scale (`guidance_embeds`, SANA-Sprint-like) is refused: SanaPipeline does not feed it.

Export: SanaPipeline runs CFG itself and feeds no guidance input, so the folder carries `SCMSanaPipeline`
(export/templates/pipeline_scm_sana.py): the stock pipeline whose call keeps every argument and defaults to the
distilled 2-step student, with the flow scheduler of flow.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import diffusers
import torch
from torch import Tensor

from ..errors import UserError
from ..export.templates.pipeline_scm_sana import SCMSanaPipeline
from ..parameterization import Condition
from .base import Inputs
from .flow import FlowTeacher
from .guidance_inputs import AddedGuidanceInput, GuidedTransformer

MAX_SEQUENCE_LENGTH = 300  # Gemma tokens, SanaPipeline's default


def sana_instruction() -> list[str]:
    """SanaPipeline's default prompt preamble (its __call__ default)."""
    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default


def sana_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a SanaTransformer2DModel (or a GuidedTransformer around one, which takes condition["guidance"])."""
    kwargs = {"guidance": condition["guidance"]} if isinstance(network, GuidedTransformer) else {}
    return network(x, encoder_hidden_states=condition["encoder_hidden_states"],
                   encoder_attention_mask=condition["encoder_attention_mask"], timestep=time, return_dict=False,
                   **kwargs)[0]  # fmt: skip


class SanaTeacher(AddedGuidanceInput, FlowTeacher):
    family = "sana"
    description = "SanaPipeline (linear-attention DiT, DC-AE latents, flow matching), text + CFG"
    pipeline_name = "SanaPipeline"
    student_pipeline_class = SCMSanaPipeline
    embedding_targets = ["time_embed.emb"]  # the embedding the guidance input is added to
    network_call = staticmethod(sana_call)

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float):
        if pipe.transformer.config.get("guidance_embeds"):
            raise UserError(f"teacher '{source}' already takes a guidance scale (guidance_embeds, a SANA-Sprint-like "
                             f"model) that SanaPipeline does not feed; distill the model it was distilled "
                             f"from.")  # fmt: skip
        super().__init__(pipe, source, folder, sigma_d)

    def time_scale(self) -> float:
        return 1000.0 * self.transformer.config.timestep_scale

    def _encode(self, prompts: list[str], negative: bool) -> Condition:
        with torch.no_grad():
            states, mask, negative_states, negative_mask = self.pipe.encode_prompt(
                prompts, do_classifier_free_guidance=negative, negative_prompt=self.negative_prompt,
                device=self.device, clean_caption=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
                complex_human_instruction=sana_instruction())  # fmt: skip
        if negative:
            states, mask = negative_states, negative_mask
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def encode(self, inputs: Inputs) -> Condition:
        return self._encode(list(inputs["prompt"]), negative=False)

    def encode_negative(self) -> Condition:
        return self._encode([""], negative=True)

    def size_inputs(self) -> Inputs:
        """SanaPipeline bins the requested size to an aspect-ratio table by default, which exists only for the
        released models' sample sizes (512-4096 px): other sizes are named in the call with binning off."""
        binned = self.transformer.config.sample_size * self.space.downsampling in (512, 1024, 2048, 4096)
        if binned and tuple(self.resolution) == tuple(self.default_resolution()):
            return {}
        return {"height": self.resolution[0], "width": self.resolution[1], "use_resolution_binning": False}

    def embedding_width(self) -> int:
        return (self.transformer.config.num_attention_heads *
                self.transformer.config.attention_head_dim)
