"""Transformer families: DiT (class-conditional, learned sigma), SD3, FLUX and Sana (text-to-image flow matching).

DiT trains DiT's hybrid loss on the linear DDPM schedule (beta 1e-4..0.02; DiT-XL-2's DDIMScheduler config):
L_simple on the first C output channels (eps) plus L_vlb on the last C (the learned-range variance, mean
stop-gradiented; objectives.py), label dropout to the null class 1000 that DiTPipeline hard-codes.
SD3 / FLUX / Sana train rectified flow (velocity eps - x0) at logit-normal times shifted by the shift their
pipelines sample with: SD3 3.0, Sana 3.0, FLUX e^mu of its dynamic shifting at this image's 16 tokens (1.58).
Each network is fed as its stock pipeline feeds it (SD3 / Sana: timestep 1000 s; FLUX: s and packed latents).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import diffusers
import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor

from . import objectives as obj
from .base import FamilySize, LatentFamily, Table, scale_only, shift_and_scale
from .data import CAPTIONS, IMAGE_SIZE
from .text import EncoderSize, clip_encoder, clip_tokenizer, gemma_encoder, gemma_tokenizer, t5_encoder, t5_tokenizer
from .training import TrainSettings

LATENT = IMAGE_SIZE // 4  # latent side (the 4x VAEs)
DIT_NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional class (num_embeds_ada_norm must be 1000)
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
T5_TEXT, CLIP_SMALL = EncoderSize(hidden=64), EncoderSize(hidden=32, projection=32)
FLUX_CLIP, GEMMA = EncoderSize(hidden=64), EncoderSize(hidden=64)
FLOW_SHIFT = 3.0  # SD3 Medium's and Sana's scheduler shift


def transformer_size(steps: int, batch: int, lr: float, guidance: float, **model) -> dict[str, FamilySize]:
    toy = TrainSettings(steps=3, batch_size=4, lr=1e-3, log_every=1)
    return {"cpu": FamilySize(model=model, train=TrainSettings(steps=steps, batch_size=batch, lr=lr),
                              guidance_scale=guidance),
            "toy": FamilySize(model={**model, "num_layers": 1, "num_attention_heads": 1}, train=toy,
                              guidance_scale=guidance)}  # fmt: skip


class DiTFamily(LatentFamily):
    """DiTPipeline: DiTTransformer2DModel with learned sigma (2C outputs), DDIMScheduler, 50 steps."""

    name, default_steps = "dit", 50
    sizes = transformer_size(10000, 32, 5e-4, 2.0, num_attention_heads=4, attention_head_dim=32, num_layers=8,
                             patch_size=2)  # cpu: 3.8M parameters, ~0.21 CPU-s per step  # fmt: skip

    def __init__(self):
        self.alphas_cumprod = diffusers.DDPMScheduler(**DIT_SCHEDULE).alphas_cumprod

    def latent_config(self, stats: dict) -> dict:
        return scale_only(stats)

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        torch.manual_seed(seed)
        c = vae.config.latent_channels
        net = diffusers.DiTTransformer2DModel(in_channels=c, out_channels=2 * c, sample_size=LATENT,
                                              num_embeds_ada_norm=DIT_NULL_CLASS, **size.model)  # fmt: skip
        scheduler = diffusers.DDIMScheduler(**DIT_SCHEDULE, clip_sample=False, set_alpha_to_one=True)
        return diffusers.DiTPipeline(transformer=net, vae=vae, scheduler=scheduler, id2label=self.id2label())

    @staticmethod
    def id2label() -> dict[int, str]:
        return {i: caption.removeprefix("a photo of a ").removeprefix("n ") for i, caption in enumerate(CAPTIONS)}

    def condition_table(self, pipe) -> Table:
        return {"class_labels": torch.tensor([*range(len(CAPTIONS)), DIT_NULL_CLASS])}

    def prepare_for_training(self, net) -> None:
        for module in net.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # the table drops labels (seeded); the embedding keeps its null row

    def loss(self, net, x0: Tensor, condition: dict, generator: torch.Generator) -> Tensor:
        tau = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = obj.vp_noised(x0, eps, self.alphas_cumprod[tau])
        eps_hat, raw_var = net(x_t, timestep=tau, class_labels=condition["class_labels"]).sample.chunk(2, dim=1)
        return obj.per_sample_mse(eps_hat, eps) + obj.vlb_bits(eps_hat, raw_var, x0, x_t, tau, self.alphas_cumprod)

    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        return {"class_labels": list(labels), "guidance_scale": guidance_scale}

    def finish_folder(self, folder: Path, size: FamilySize) -> None:
        """DiTPipeline does not save id2label; written into model_index.json as the Hub's DiT folders have it."""
        index = json.loads((folder / "model_index.json").read_text())
        index["id2label"] = {str(k): v for k, v in self.id2label().items()}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


class FlowFamily(LatentFamily):
    """Shared by the flow families: rectified flow at shifted logit-normal times."""

    shift: float

    def latent_config(self, stats: dict) -> dict:
        return shift_and_scale(stats)

    def loss(self, net, x0: Tensor, condition: dict, generator: torch.Generator) -> Tensor:
        s = obj.shift_times(obj.logit_normal_times(x0.shape[0], generator), self.shift)
        x_s, u = obj.flow_noised(x0, torch.randn(x0.shape, generator=generator), s)
        return obj.per_sample_mse(self.velocity(net, x_s, s, condition), u)

    def velocity(self, net, x_s: Tensor, s: Tensor, condition: dict) -> Tensor:
        raise NotImplementedError

    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        return {"prompt": [CAPTIONS[label] for label in labels], "guidance_scale": guidance_scale}


class SD3Family(FlowFamily):
    """StableDiffusion3Pipeline: MMDiT over two CLIP encoders (with projections) and T5, shift 3, 28 steps."""

    name, default_steps, shift = "sd3", 28, FLOW_SHIFT
    sizes = transformer_size(4000, 32, 5e-4, 2.0, num_attention_heads=2, attention_head_dim=32, num_layers=4,
                             patch_size=2)  # cpu: 0.6M parameters, ~0.6 CPU-s per step (288 text tokens)  # fmt: skip

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        torch.manual_seed(seed)
        model = dict(size.model)
        inner = model["num_attention_heads"] * model["attention_head_dim"]
        c = vae.config.latent_channels
        net = diffusers.SD3Transformer2DModel(sample_size=LATENT, in_channels=c, out_channels=c,
                                              joint_attention_dim=T5_TEXT.hidden, caption_projection_dim=inner,
                                              pooled_projection_dim=2 * CLIP_SMALL.projection,
                                              pos_embed_max_size=LATENT // model["patch_size"], **model)  # fmt: skip
        return diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=self.shift), vae=vae,
            text_encoder=clip_encoder(CLIP_SMALL, seed + 1), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_encoder(CLIP_SMALL, seed + 2), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_encoder(T5_TEXT, seed + 3), tokenizer_3=t5_tokenizer())  # fmt: skip

    @torch.no_grad()
    def condition_table(self, pipe) -> Table:
        states, empty, pooled, empty_pooled = pipe.encode_prompt(list(CAPTIONS), None, None, device="cpu",
                                                                 do_classifier_free_guidance=True)  # fmt: skip
        return {"encoder_hidden_states": torch.cat([states, empty[:1]]),
                "pooled_projections": torch.cat([pooled, empty_pooled[:1]])}  # fmt: skip

    def velocity(self, net, x_s: Tensor, s: Tensor, condition: dict) -> Tensor:
        return net(x_s, encoder_hidden_states=condition["encoder_hidden_states"],
                   pooled_projections=condition["pooled_projections"], timestep=1000 * s).sample  # fmt: skip


# FluxPipeline's scheduler (FLUX.1's scheduler_config.json): dynamic shifting, mu linear in the token count.
FLUX_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                  "shift": 3.0, "use_dynamic_shifting": True, "num_train_timesteps": 1000}  # fmt: skip


def flux_shift(image_tokens: int) -> float:
    """e^mu of FluxPipeline's calculate_shift for `image_tokens` packed tokens (the exponential time shift
    e^mu / (e^mu + 1/s - 1) is SD3's shift with shift = e^mu)."""
    c = FLUX_SCHEDULER
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return math.exp(c["base_shift"] + slope * (image_tokens - c["base_image_seq_len"]))


class FluxFamily(FlowFamily):
    """FluxPipeline without a guidance embedding (schnell / base layout, read with true CFG): MMDiT double and
    single blocks on 2x2-packed latents, CLIP pooled + T5 states, dynamic shift, 28 steps."""

    name, default_steps = "flux", 28
    shift = flux_shift((LATENT // 2) ** 2)
    # cpu: ~1.3 CPU-s per step, nearly all of it the 512 T5 tokens of FluxPipeline's default max_sequence_length
    sizes = transformer_size(2400, 32, 5e-4, 2.0, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                             num_single_layers=2, axes_dims_rope=(8, 12, 12))  # fmt: skip

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        torch.manual_seed(seed)
        model = dict(size.model)
        if model["num_attention_heads"] == 1:  # toy size: rope axes must sum to the head dim
            model["num_single_layers"] = 1
        packed = 4 * vae.config.latent_channels  # 2x2 latent patches per token
        net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=packed, joint_attention_dim=T5_TEXT.hidden,
                                               pooled_projection_dim=FLUX_CLIP.hidden, guidance_embeds=False,
                                               **model)  # fmt: skip
        return diffusers.FluxPipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
            text_encoder=clip_encoder(FLUX_CLIP, seed + 1), tokenizer=clip_tokenizer(),
            text_encoder_2=t5_encoder(T5_TEXT, seed + 2), tokenizer_2=t5_tokenizer())  # fmt: skip

    @torch.no_grad()
    def condition_table(self, pipe) -> Table:
        states, pooled, _ = pipe.encode_prompt([*CAPTIONS, ""], None, device="cpu")  # "" = the negative prompt
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def velocity(self, net, x_s: Tensor, s: Tensor, condition: dict) -> Tensor:
        B, C, h, w = x_s.shape
        packed = diffusers.FluxPipeline._pack_latents(x_s, B, C, h, w)
        image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x_s.device, x_s.dtype)
        states = condition["encoder_hidden_states"]
        text_ids = torch.zeros(states.shape[1], 3, dtype=x_s.dtype)
        out = net(packed, encoder_hidden_states=states, pooled_projections=condition["pooled_projections"],
                  timestep=s, img_ids=image_ids, txt_ids=text_ids).sample  # fmt: skip
        return diffusers.FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)  # 4: the VAE's factor

    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        # FluxPipeline's default size is its default_sample_size 128 x the VAE's factor (512 px here): name 32
        return {"prompt": [CAPTIONS[label] for label in labels], "negative_prompt": [""] * len(labels),
                "true_cfg_scale": guidance_scale, "height": IMAGE_SIZE, "width": IMAGE_SIZE}  # fmt: skip


def sana_instruction() -> list[str]:
    """SanaPipeline.__call__'s default prompt preamble (complex_human_instruction)."""
    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaFamily(FlowFamily):
    """SanaPipeline: linear-attention transformer on DC-AE latents, Gemma states (prompts prefixed with the
    pipeline's instruction), DPM-Solver on flow sigmas with flow_shift 3, 20 steps."""

    name, vae_kind, default_steps, shift = "sana", "dc", 20, FLOW_SHIFT
    # cpu: 1.0M parameters, ~0.75 CPU-s per step (cross-attention to 300 Gemma tokens)
    sizes = transformer_size(3200, 32, 5e-4, 2.0, num_attention_heads=3, attention_head_dim=32, num_layers=6,
                             mlp_ratio=2.5)  # fmt: skip

    def latent_config(self, stats: dict) -> dict:
        return scale_only(stats)

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        torch.manual_seed(seed)
        model = dict(size.model)
        heads, dim = model.pop("num_attention_heads"), model.pop("attention_head_dim")
        c = vae.config.latent_channels
        net = diffusers.SanaTransformer2DModel(in_channels=c, out_channels=c, num_attention_heads=heads,
                                               attention_head_dim=dim, num_cross_attention_heads=heads,
                                               cross_attention_head_dim=dim, cross_attention_dim=heads * dim,
                                               caption_channels=GEMMA.hidden, sample_size=LATENT, patch_size=1,
                                               **model)  # fmt: skip
        scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                          flow_shift=self.shift, algorithm_type="dpmsolver++",
                                                          solver_order=2, final_sigmas_type="zero")  # fmt: skip
        return diffusers.SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=gemma_encoder(GEMMA, seed + 1),
                                      vae=vae, transformer=net, scheduler=scheduler)  # fmt: skip

    @torch.no_grad()
    def condition_table(self, pipe) -> Table:
        states, mask, empty, empty_mask = pipe.encode_prompt(list(CAPTIONS), True, "", device="cpu",
                                                             complex_human_instruction=sana_instruction())  # fmt: skip
        return {"encoder_hidden_states": torch.cat([states, empty[:1]]),
                "encoder_attention_mask": torch.cat([mask, empty_mask[:1]])}  # fmt: skip

    def velocity(self, net, x_s: Tensor, s: Tensor, condition: dict) -> Tensor:
        return net(x_s, encoder_hidden_states=condition["encoder_hidden_states"],
                   encoder_attention_mask=condition["encoder_attention_mask"],
                   timestep=1000 * s * net.config.timestep_scale).sample  # fmt: skip

    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        # SanaPipeline's call defaults to 1024 px and bins sizes for sample sizes 16..128 only: name 32, unbinned
        return {"prompt": [CAPTIONS[label] for label in labels], "guidance_scale": guidance_scale,
                "height": IMAGE_SIZE, "width": IMAGE_SIZE, "use_resolution_binning": False}  # fmt: skip
