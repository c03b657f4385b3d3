"""Stable Diffusion 3 teachers (`StableDiffusion3Pipeline`): an MMDiT flow-matching transformer on VAE latents.

Conditions as the pipeline's `encode_prompt` builds them: the joint text states (two CLIP encoders and T5) and the
pooled CLIP projections; CFG's unconditional branch is the negative prompt (empty by default). The network time is
1000 s, the pipeline's timestep (flow.py).

Student: SD3 has no guidance input, so the student is the transformer plus a zero-initialised guidance embedding
added to `time_text_embed`, the time-and-pooled-text embedding that conditions every block (guided_latent.py).

Export: the stock pipeline cannot feed that input, so a full student's folder carries its own pipeline file
(`SCMStableDiffusion3Pipeline` in pipeline_scm_flow.py, a StableDiffusion3Pipeline subclass) with a stock
FlowMatchLCMScheduler, and its default call is the 2-step student. A LoRA student has no guidance input (CFG is
distilled at guidance.scale): the stock pipeline + FlowMatchLCMScheduler with the exact call in scm_call.json,
and the adapters for the original teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..lora import has_lora
from ..parameterization import Condition
from .base import ExportInfo
from .flow import FlowTeacher
from .guided_latent import GUIDANCE_COMPONENT, GuidedTransformer, with_guidance_input

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, StableDiffusion3Pipeline's default


def sd3_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds an SD3Transformer2DModel (or a GuidedTransformer around one, which takes condition["guidance"])."""
    kwargs = {"guidance_scale": condition["guidance"]} if isinstance(network, GuidedTransformer) else {}
    return network(hidden_states=x, timestep=time, encoder_hidden_states=condition["encoder_hidden_states"],
                   pooled_projections=condition["pooled_projections"], return_dict=False, **kwargs)[0]  # fmt: skip


class StableDiffusion3Teacher(FlowTeacher):
    family = "sd3"
    description = "StableDiffusion3Pipeline (MMDiT, flow matching), latent space, text + CFG"
    pipeline_name = "StableDiffusion3Pipeline"
    network_call = staticmethod(sd3_call)

    @torch.no_grad()
    def text_condition(self, prompts: list[str]) -> Condition:
        states, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                       device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    @torch.no_grad()
    def negative_condition(self) -> Condition:
        _, states, _, pooled = self.pipe.encode_prompt(prompt=[""], prompt_2=None, prompt_3=None, device=self.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                       negative_prompt=[self.negative_prompt],
                                                       max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def network_with_guidance_input(self, dropout: float) -> GuidedTransformer:
        return with_guidance_input(self.transformer, self.transformer.inner_dim, ["time_text_embed"],
                                   self.embedding_dim, dropout)  # fmt: skip

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if has_lora(network):
            return self.export_stock(network, folder, info)
        if not isinstance(network, GuidedTransformer):
            raise NotImplementedError("the SD3 export needs the guided student of this family or a LoRA student.")
        self.export_pipeline_file(network.transformer, folder, info, "SCMStableDiffusion3Pipeline",
                                  {GUIDANCE_COMPONENT: ["scm_guidance", "SCMGuidanceEmbedding"],
                                   "max_sequence_length": MAX_SEQUENCE_LENGTH})  # fmt: skip
        network.save_guidance_input(folder)
