"""DiT teachers (`DiTPipeline`): a class-conditional DiT transformer on VAE latents with a DDPM-family schedule.

The transformer predicts eps (or v) on the scheduler's variance-preserving schedule (vp.py); with learned variance
it outputs 2C channels and the first C are the prediction (METHOD.md §2). Labels come from the data's class
subfolders (the imagefolder convention: sorted folder names -> 0, 1, ...; ImageNet's sorted synset folders give
DiT's own class ids). The teacher is read with classifier-free guidance against DiT's null class, index
`num_embeds_ada_norm` of its label table, at per-sample scales s (guided.py).

Student: the teacher's transformer plus a zero-initialised guidance-scale input added to every block's
time-and-class embedding (guidance_inputs.py), read as v-prediction like every VP teacher (student.py).

Export: stock `DiTPipeline` takes no guidance input and does not pass its generator to the scheduler, so the folder
carries its own pipeline file (`SCMDiTPipeline`, export/templates/pipeline_scm_dit.py, a DiTPipeline subclass) with
a stock LCMScheduler on the distilled grid (vp.py) and the guidance input as its own component.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor

from ..errors import UserError
from ..export.contract import ExportDescription
from ..export.templates.pipeline_scm_dit import SCMDiTPipeline
from ..guidance import GuidedModel
from ..loading import check_trainable_weights, quiet_loading
from ..parameterization import Condition, freeze
from .base import ExportInfo, Inputs, read_model_index
from .guidance_inputs import GuidedTransformer, guidance_embedder, with_guidance_input
from .guided import GuidedLatentTeacher
from .latent import LatentSpace
from .vp import (
    LCM_MORE_STEPS,
    lcm_original_steps,
    lcm_scheduler,
    lcm_times,
    scheduler_config,
    vp_prediction,
    vp_process,  # fmt: skip
)


def dit_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a DiT (or a GuidedTransformer around one, which takes condition["guidance"]): one timestep per
    sample, as DiTPipeline passes them; with learned variance only the first C output channels are the prediction."""
    time = time.expand(x.shape[0]) if time.dim() == 0 else time
    kwargs = {"guidance": condition["guidance"]} if isinstance(network, GuidedTransformer) else {}
    out = network(x, timestep=time, class_labels=condition["class_labels"], **kwargs).sample
    return out[:, : x.shape[1]]


def embedding_targets(transformer: torch.nn.Module) -> list[str]:
    """DiT's time-and-class embeddings: one per block (block 0's also conditions the output layer)."""
    return [f"transformer_blocks.{i}.norm1.emb" for i in range(len(transformer.transformer_blocks))]


class DiTTeacher(GuidedLatentTeacher):
    family = "dit"
    description = "DiTPipeline (class-conditional DiT, learned variance), latent space, CFG against the null class"
    pipeline_name = "DiTPipeline"
    pipeline_tag = None  # the Hub has no class-conditional task; the card tags it "class-conditional" instead
    inputs_kind = "class_labels"
    lora_supported = False

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float):
        self.pipe, self.source, self.folder = pipe, source, Path(folder)
        self.denoiser = self.transformer = freeze(pipe.transformer)
        freeze(pipe.vae)
        self.space = LatentSpace(pipe.vae)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        self.resolution = self.default_resolution()
        self.id2label = read_model_index(self.folder).get("id2label") if (self.folder / "model_index.json").is_file() \
            else None  # fmt: skip
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
                        dtype: torch.dtype, variant: str | None = None) -> DiTTeacher:  # fmt: skip
        check_trainable_weights(Path(folder), "transformer", source, device)
        with quiet_loading():
            pipe = diffusers.DiTPipeline.from_pretrained(folder, torch_dtype=dtype, variant=variant)
        return cls(pipe.to(device), source, folder, sigma_d)

    def default_resolution(self) -> tuple[int, int]:
        return (self.transformer.config.sample_size * self.space.downsampling,) * 2

    @property
    def null_class(self) -> int:
        """The unconditional label: the last row of the label table (DiTPipeline hard-codes 1000)."""
        return self.transformer.config.num_embeds_ada_norm

    @property
    def num_classes(self) -> int:
        """The labels the teacher knows, 0..num_classes-1: those its id2label names when it names fewer than the
        label table has (a DiT trained on 10 classes keeps the 1000-row table DiTPipeline needs for its null class,
        and labels 10..999 were never trained), else the whole table."""
        known = max((int(label) for label in self.id2label or {}), default=self.null_class - 1) + 1
        return min(known, self.null_class)

    def check_data(self, images) -> None:
        if images.num_classes is None:
            raise UserError(f"the teacher is class-conditional but data '{images.name}' has no labels (an image "
                             f"folder needs one subfolder per class).")  # fmt: skip
        if images.num_classes > self.num_classes:
            raise UserError(f"data '{images.name}' has {images.num_classes} classes but the teacher knows "
                             f"{self.num_classes} (labels 0 to {self.num_classes - 1}); use at most "
                             f"{self.num_classes} class folders.")  # fmt: skip
        expected = self.default_resolution()
        if tuple(images.resolution) != expected:
            h, w = images.resolution
            raise UserError(f"data '{images.name}' is {h}x{w} but the teacher generates {expected[0]}x{expected[1]} "
                             f"images; set data.resize_to {expected[0]}.")  # fmt: skip
        self.space.check_images(images)

    def check_student(self, prediction) -> None:
        if prediction not in (None, "v_prediction"):
            raise UserError(f"the DiT export reads a v_prediction student, not {prediction}.")

    # --- conditions ----------------------------------------------------------------------------------------

    def encode(self, inputs: Inputs) -> Condition:
        return {"class_labels": torch.as_tensor(inputs["class_labels"]).reshape(-1).to(self.device)}

    def encode_negative(self) -> Condition:
        return {"class_labels": torch.full((1,), self.null_class, dtype=torch.long, device=self.device)}

    def batch_inputs(self, batch: dict) -> Inputs:
        return {"class_labels": batch["label"]}

    def sample_inputs(self, n: int, generator: torch.Generator) -> Inputs:
        return {"class_labels": torch.randint(0, self.num_classes, (n,), generator=generator).tolist()}

    # --- students and exports --------------------------------------------------------------------------------

    def student_call(self):
        return dit_call

    def guided_network(self, dropout: float) -> GuidedTransformer:
        """The transformer with a zero-initialised guidance input; label dropout off (CFG is explicit)."""
        embedder = guidance_embedder(self.transformer, self.transformer.inner_dim, embedding_targets(self.transformer),
                                     self.embedding_dim, self.default_scale, self.scales)  # fmt: skip
        network = with_guidance_input(self.transformer, embedder, dropout)
        for module in network.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # in training mode it would drop labels at random
        return network

    def student_pipeline(self, network: GuidedTransformer, info: ExportInfo) -> SCMDiTPipeline:
        K = lcm_original_steps(self.model.process, info.t_max, info.t_mid)
        return SCMDiTPipeline(transformer=network.transformer, vae=self.pipe.vae,
                              scheduler=lcm_scheduler(self.scheduler_config, info.prediction, K),
                              guidance_embedder=network.guidance_embedder, id2label=self.id2label)  # fmt: skip

    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        times, timesteps = lcm_times(self.model.process, pipeline.scheduler)
        return self.described(info, pipeline, True, times, timesteps, LCM_MORE_STEPS, num_classes=self.num_classes,
                              **self.guidance_fields(True))
