"""The distilled sCM student of SD3 as a `StableDiffusion3Pipeline` (written by scm-distill; torch + diffusers only).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2. The sampler is the stock pipeline's loop with the folder's scheduler
(`scheduler/scheduling_scm_flow.py`: the distilled flow times, consistency steps). Classifier-free guidance is
distilled: the `guidance_embedder` (`guidance_embedder/scm_guidance.py`) adds the embedding of the guidance scale to
the transformer's time-and-text embedding, so a call makes one network evaluation per step and runs no CFG branch.
This subclass changes only that and two defaults: `pipe(prompt, num_inference_steps=2)`, every other argument of the
stock call as it is, `guidance_scale` defaulting to the distilled scale (one outside the distilled range is an error).
"""

from __future__ import annotations

import inspect
import sys

import torch
from diffusers import StableDiffusion3Pipeline

STOCK_CALL = inspect.signature(StableDiffusion3Pipeline.__call__)
DEFAULTS = {"num_inference_steps": 2, "guidance_scale": None}  # None: the distilled scale


class SCMStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose call is the distilled student at its distilled guidance scale."""

    __module__ = "pipeline_scm_sd3"  # the file this class is shipped in
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->guidance_embedder->transformer->vae"

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, guidance_embedder: torch.nn.Module, image_encoder=None,
                 feature_extractor=None):  # fmt: skip
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)  # fmt: skip
        self.register_modules(guidance_embedder=guidance_embedder)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return False  # guidance is distilled: the scale goes through guidance_embedder, no unconditional branch

    def __call__(self, *args, **kwargs):
        call = STOCK_CALL.bind(self, *args, **kwargs)
        return self.guidance_embedder.distilled_call(super().__call__, self.transformer, call)

    __call__.__signature__ = STOCK_CALL.replace(parameters=[p.replace(default=DEFAULTS.get(p.name, p.default))
                                                            for p in STOCK_CALL.parameters.values()])

    @classmethod
    def _get_signature_types(cls) -> dict:
        """`from_pipe` keeps a component only if its class is the annotated one: the guidance input's class is the
        one diffusers loaded from the folder's scm_guidance.py (or scm-distill's own copy of it)."""
        loaded = tuple(m.SCMGuidanceEmbedding for name, m in list(sys.modules.items())
                       if name.endswith("scm_guidance") and hasattr(m, "SCMGuidanceEmbedding"))  # fmt: skip
        return {**StableDiffusion3Pipeline._get_signature_types(), "guidance_embedder": loaded}  # the stock annotations

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        self.guidance_embedder.ship_pipeline_code(self, save_directory, __file__)
