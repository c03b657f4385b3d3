"""Sana teachers (`SanaPipeline`): a linear-attention flow-matching transformer on deep-compression (DC-AE) latents.

Conditions as the pipeline's `encode_prompt` builds them: Gemma states and their attention mask, prompts prefixed
with the pipeline's own default instruction (`complex_human_instruction`); CFG's unconditional branch is the
negative prompt without it, as in the pipeline. The network time is 1000 s x `timestep_scale` (what SanaPipeline
feeds); Sana's default scheduler (DPM-Solver on flow sigmas) is accepted like FlowMatchEulerDiscreteScheduler.

Guidance: a teacher with `guidance_embeds` (SANA-Sprint-like) takes s x `guidance_embeds_scale` itself and is read
without CFG; otherwise the teacher is read with CFG and the student is the transformer rebuilt with Sana's own
guidance embedding (`guidance_embeds=True`), whose last layer starts at zero, so it equals the teacher at init.

Export: SanaPipeline feeds no guidance input (and SanaSprintPipeline feeds the time unscaled, which a Sana teacher
was not trained on), so a full student's folder carries its own pipeline file (`SCMSanaPipeline` in
pipeline_scm_flow.py, a SanaPipeline subclass) with a stock FlowMatchLCMScheduler; its default call is the 2-step
student. A LoRA student of a teacher without guidance input (CFG distilled at guidance.scale) exports the stock
SanaPipeline + FlowMatchLCMScheduler with the exact call in scm_call.json, and the adapters.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import diffusers
import torch
from diffusers import SanaTransformer2DModel
from torch import Tensor

from ..lora import has_lora, merged_copy
from ..parameterization import Condition
from .base import ExportInfo
from .flow import FlowTeacher
from .guided_latent import rebuilt_with_guidance_embedding

MAX_SEQUENCE_LENGTH = 300  # Gemma tokens, SanaPipeline's default
OLD_TIME_EMBED, NEW_TIME_EMBED = "time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."


def sana_instruction() -> list[str]:
    """SanaPipeline's default prompt preamble (its __call__ default)."""
    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default


def sana_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a SanaTransformer2DModel; models with a guidance embedding get s x guidance_embeds_scale."""
    config = network.config
    guidance = condition["guidance"] * config.guidance_embeds_scale if config.guidance_embeds else None
    return network(x, encoder_hidden_states=condition["encoder_hidden_states"],
                   encoder_attention_mask=condition["encoder_attention_mask"], timestep=time, guidance=guidance,
                   return_dict=False)[0]  # fmt: skip


def transformer_with_guidance_embedding(transformer: SanaTransformer2DModel) -> SanaTransformer2DModel:
    """The transformer rebuilt with `guidance_embeds`: the time embedding's weights move to their new names, the
    guidance embedding's last layer is zero (its output is exactly 0, so the student equals the teacher)."""
    weights = {key.replace(OLD_TIME_EMBED, NEW_TIME_EMBED): value for key, value in transformer.state_dict().items()}
    return rebuilt_with_guidance_embedding(transformer, "time_embed", weights)


class SanaTeacher(FlowTeacher):
    family = "sana"
    description = "SanaPipeline (linear-attention DiT, DC-AE latents, flow matching), text + CFG"
    pipeline_name = "SanaPipeline"
    network_call = staticmethod(sana_call)
    extra_call_kwargs = {"use_resolution_binning": False}  # the stock call keeps the exported size

    def time_scale(self) -> float:
        return 1000.0 * self.transformer.config.timestep_scale

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative: bool) -> Condition:
        states, mask, negative_states, negative_mask = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=negative, negative_prompt=self.negative_prompt,
            device=self.device, clean_caption=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
            complex_human_instruction=sana_instruction())  # fmt: skip
        if negative:
            states, mask = negative_states, negative_mask
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def text_condition(self, prompts: list[str]) -> Condition:
        return self._encode(prompts, negative=False)

    def negative_condition(self) -> Condition:
        return self._encode([""], negative=True)

    def network_with_guidance_input(self, dropout: float) -> SanaTransformer2DModel:
        if self.native_guidance:
            return copy.deepcopy(self.transformer).train().requires_grad_(True)
        return transformer_with_guidance_embedding(self.transformer).train().requires_grad_(True)

    def pipeline_time(self, t: Tensor, latents: Tensor) -> Tensor:
        return t * self.transformer.config.timestep_scale

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if has_lora(network) and not network.config.guidance_embeds:
            return self.export_stock(network, folder, info)
        if has_lora(network):
            self.save_lora(network, folder)
            network = merged_copy(network)
        self.export_pipeline_file(network, folder, info, "SCMSanaPipeline",
                                  {"max_sequence_length": MAX_SEQUENCE_LENGTH})  # fmt: skip
