"""DiT teachers (`DiTPipeline`): a class-conditional DiT transformer on VAE latents with a DDPM-family schedule.

The transformer predicts eps (or v) on the scheduler's variance-preserving schedule (vp.py); with learned variance
it outputs 2C channels and the first C are the prediction (METHOD.md §2). Labels come from the data's class
subfolders (the imagefolder convention: sorted folder names -> 0, 1, ...; ImageNet's sorted synset folders give
DiT's own class ids). The teacher is read with classifier-free guidance against DiT's null class, index
`num_embeds_ada_norm` of its label table (1000 for the ImageNet models), at per-sample scales s (guidance.py).

Student: the teacher's transformer plus a zero-initialised guidance-scale input added to every block's
time-and-class embedding (guided_latent.py), read as v-prediction like every VP teacher (student.py).

Export: stock `DiTPipeline` takes neither custom timesteps nor a guidance input, so the folder carries its own
pipeline file, `pipeline_scm_dit.py` (a `DiTPipeline` subclass), plus the guidance input's component file. It
samples with a stock LCMScheduler on the exported integer timesteps (lcm.py, as the SD family); its default call
is the 2-step student at the distilled guidance scale, and gives exactly this module's `consistency_samples`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor

from ..export.card import write_model_card
from ..parameterization import Condition, NativeModel, Prediction, freeze
from ..student import student_prediction
from .base import ExportInfo, read_model_index
from .guidance import GuidedModel, expand_condition, sample_guidance_scales
from .guided_latent import GUIDANCE_COMPONENT, GuidedLatentTeacher, GuidedTransformer, with_guidance_input
from .latent import LatentSpace
from .lcm import consistency_timesteps, lcm_export_samples, lcm_scheduler
from .sd import half_precision_only, quiet_loading
from .vp import scheduler_config, vp_prediction, vp_process

TEMPLATE = Path(__file__).resolve().parent.parent / "export" / "templates" / "pipeline_scm_dit.py"
PIPELINE_CLASS = "SCMDiTPipeline"


def dit_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a DiT (or a GuidedTransformer around one): one timestep per sample, as DiTPipeline passes them; with
    learned variance only the first C output channels are the prediction."""
    time = time.expand(x.shape[0]) if time.dim() == 0 else time
    kwargs = {"guidance_scale": condition["guidance_scale"]} if isinstance(network, GuidedTransformer) else {}
    out = network(x, timestep=time, class_labels=condition["class_labels"], **kwargs).sample
    return out[:, : x.shape[1]]


def embedding_targets(transformer: torch.nn.Module) -> list[str]:
    """DiT's time-and-class embeddings: one per block (block 0's also conditions the output layer)."""
    return [f"transformer_blocks.{i}.norm1.emb" for i in range(len(transformer.transformer_blocks))]


class DiTTeacher(GuidedLatentTeacher):
    family = "dit"
    description = "DiTPipeline (class-conditional DiT, learned variance), latent space, CFG against the null class"

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float):
        self.pipe, self.source, self.folder = pipe, source, Path(folder)
        self.transformer = freeze(pipe.transformer)
        freeze(pipe.vae)
        self.space = LatentSpace(pipe.vae)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        size = self.transformer.config.sample_size
        self.resolution = (size * self.space.downsampling,) * 2
        self.reset_run_settings()
        self.model = self._teacher_model(sigma_d)

    def _teacher_model(self, sigma_d: float) -> GuidedModel:
        return GuidedModel(self.transformer, vp_process(self.scheduler_config, sigma_d),
                           vp_prediction(self.scheduler_config), sigma_d, dit_call)  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == "DiTPipeline"

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype) -> DiTTeacher:  # fmt: skip
        if half_precision_only(Path(folder) / "transformer") and device.type == "cpu":
            raise ValueError(f"teacher '{source}' has only 16-bit weights, which are meant for GPUs (on the CPU the "
                             f"toolkit trains in float32); run on a GPU or give a checkpoint with float32 "
                             f"weights.")  # fmt: skip
        with quiet_loading():
            pipe = diffusers.DiTPipeline.from_pretrained(folder, torch_dtype=dtype)
        return cls(pipe.to(device), source, folder, sigma_d)

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def check_data(self, images) -> None:
        if images.num_classes is None:
            raise ValueError(f"the teacher is class-conditional but data '{images.name}' has no labels (an image "
                             f"folder needs one subfolder per class).")  # fmt: skip
        if images.num_classes > self.num_classes:
            raise ValueError(f"data '{images.name}' has {images.num_classes} classes but the teacher knows "
                             f"{self.num_classes} (labels 0 to {self.num_classes - 1}); use at most "
                             f"{self.num_classes} class folders.")  # fmt: skip
        expected = self.resolution
        if tuple(images.resolution) != expected:
            h, w = images.resolution
            raise ValueError(f"data '{images.name}' is {h}x{w} but the teacher generates {expected[0]}x{expected[1]} "
                             f"images; set data.resize_to {expected[0]}.")  # fmt: skip
        self.space.check_images(images)

    # --- conditions ----------------------------------------------------------------------------------------

    def condition(self, labels: Tensor, scales: Tensor | float) -> Condition:
        """A guided condition: class labels, the null class as CFG's unconditional branch, scales s [B]."""
        n = labels.shape[0]
        s = torch.full((n,), float(scales)) if not isinstance(scales, Tensor) else scales
        null = torch.full((1,), self.num_classes, dtype=torch.long, device=self.device)
        return {"class_labels": labels.to(self.device), "uncond": expand_condition({"class_labels": null}, n),
                "guidance_scale": s.to(self.device, torch.float32)}  # fmt: skip

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        x0 = self.encode_batch(batch, self.device)
        s = sample_guidance_scales(x0.shape[0], *self.scales, generator)
        return x0, self.condition(batch["label"], s)

    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return self.condition(labels, self.default_scale)

    # --- students and sampling -----------------------------------------------------------------------------

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """The transformer with a zero-initialised guidance input; label dropout off (CFG is explicit)."""
        network = with_guidance_input(self.transformer, self.transformer.inner_dim,
                                      embedding_targets(self.transformer), self.embedding_dim, dropout)  # fmt: skip
        for module in network.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # in training mode it would drop labels at random
        teacher = self.model
        return NativeModel(network, teacher.process, prediction or student_prediction(teacher), teacher.sigma_d,
                           dit_call)  # fmt: skip

    def consistency_samples(self, model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float,
                            t_mid: float, generator, condition: Condition | None = None,
                            device=None) -> Tensor:  # fmt: skip
        """The export's sampler: the sCM times snapped to integer timesteps, a stock LCMScheduler (lcm.py)."""
        return lcm_export_samples(model, self.scheduler_config, shape, num_steps, t_max, t_mid, generator, condition,
                                  device or self.device)  # fmt: skip

    # --- export --------------------------------------------------------------------------------------------

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if not isinstance(network, GuidedTransformer) or info.prediction != "v_prediction":
            raise NotImplementedError("the DiT export needs the guided v-prediction student of this family.")
        network.save_components(folder)
        self.pipe.vae.save_pretrained(folder / "vae", safe_serialization=True)
        lcm_scheduler(self.scheduler_config, info.prediction).save_pretrained(folder / "scheduler")
        shutil.copyfile(TEMPLATE, folder / TEMPLATE.name)
        timesteps = consistency_timesteps(self.model.process, 2, info.t_max, info.t_mid)
        model_index = {
            "_class_name": [TEMPLATE.stem, PIPELINE_CLASS],
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", type(network.transformer).__name__],
            "vae": ["diffusers", type(self.pipe.vae).__name__],
            "scheduler": ["diffusers", "LCMScheduler"],
            GUIDANCE_COMPONENT: ["scm_guidance", "SCMGuidanceEmbedding"],
            "timesteps": timesteps,
            "guidance_scale": self.default_scale,
        }
        id2label = read_model_index(self.folder).get("id2label")
        if id2label:
            model_index["id2label"] = id2label
        (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        t_max, t_mid = self.model.process.t_at(torch.tensor(timesteps, dtype=torch.float64)).tolist()
        facts = {**info.card_facts, "sigma_data (measured on the latents)": f"{self.model.sigma_d:.4f}",
                 "timesteps (2 steps)": timesteps,
                 "guidance": f"student input, trained on s ~ U[{self.scales[0]}, {self.scales[1]}], default "
                             f"{self.default_scale}"}  # fmt: skip
        info = dataclasses.replace(info, sigma_data=round(self.model.sigma_d, 6), card_facts=facts, t_max=t_max,
                                   t_mid=t_mid)  # the card states the snapped times  # fmt: skip
        write_model_card(folder, info, usage=USAGE, pipeline_tag="unconditional-image-generation")


USAGE = """\
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID", trust_remote_code=True)  # SCMDiTPipeline
images = pipe(class_labels=[207, 360, 387, 974], generator=torch.Generator().manual_seed(0)).images  # 2 steps
images[0].save("sample.png")"""
