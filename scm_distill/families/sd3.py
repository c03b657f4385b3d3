"""Stable Diffusion 3 teachers (`StableDiffusion3Pipeline`): an MMDiT flow-matching transformer on VAE latents.

Conditions as the pipeline's `encode_prompt` builds them: the joint text states (two CLIP encoders and T5) and the
pooled CLIP projections; CFG's unconditional branch is the negative prompt (empty by default). The network time is
1000 s, the pipeline's timestep (flow.py).

Student: SD3 has no guidance input, so the student is the transformer plus a zero-initialised guidance embedding
added to `time_text_embed`, the time-and-pooled-text embedding that conditions every block (guidance_inputs.py); a
LoRA student carries the same input at zero (CFG distilled at one scale).

Export: the stock pipeline cannot feed that input (it runs CFG itself), so the folder carries
`SCMStableDiffusion3Pipeline` (export/templates/pipeline_scm_sd3.py): the stock pipeline whose call keeps every
argument and defaults to the distilled 2-step student, with the flow scheduler of flow.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..export.templates.pipeline_scm_sd3 import SCMStableDiffusion3Pipeline
from ..parameterization import Condition
from .base import Inputs
from .flow import FlowTeacher
from .guidance_inputs import AddedGuidanceInput, GuidedTransformer

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, StableDiffusion3Pipeline's default


def sd3_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds an SD3Transformer2DModel (or a GuidedTransformer around one, which takes condition["guidance"])."""
    kwargs = {"guidance": condition["guidance"]} if isinstance(network, GuidedTransformer) else {}
    return network(hidden_states=x, timestep=time, encoder_hidden_states=condition["encoder_hidden_states"],
                   pooled_projections=condition["pooled_projections"], return_dict=False, **kwargs)[0]  # fmt: skip


class StableDiffusion3Teacher(AddedGuidanceInput, FlowTeacher):
    family = "sd3"
    description = "StableDiffusion3Pipeline (MMDiT, flow matching), latent space, text + CFG"
    pipeline_name = "StableDiffusion3Pipeline"
    student_pipeline_class = SCMStableDiffusion3Pipeline
    embedding_targets = ["time_text_embed"]  # the embedding the guidance input is added to
    network_call = staticmethod(sd3_call)

    def _encode(self, prompts: list[str], negative: bool) -> Condition:
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=negative,
                                          negative_prompt=[self.negative_prompt] if negative else None,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        states, pooled = (out[1], out[3]) if negative else (out[0], out[2])
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def encode(self, inputs: Inputs) -> Condition:
        return self._encode(list(inputs["prompt"]), negative=False)

    def encode_negative(self) -> Condition:
        return self._encode([""], negative=True)

    def embedding_width(self) -> int:
        return self.transformer.inner_dim
