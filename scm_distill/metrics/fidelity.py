"""FID, KID and precision/recall with torch-fidelity's extractors and metric functions, and no pickles on disk.

torch-fidelity's own `calculate_metrics` caches features and statistics as `.pt` pickles that it loads with
`weights_only=False` (a planted cache file would run code). Here the same computation is assembled from its parts:
features come from torch-fidelity's dataset loop on the registered extractor, the metrics from its
`fid_*` / `kid_*` / `prc_*` functions with the options `calculate_metrics` would pass, and the reference features
are cached as safetensors (`<key>-<pixel digest>-<feature space>-<layer>.safetensors`). `.pt` files in the cache
folder are never read.
"""

import hashlib
import os
import uuid

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torch_fidelity.utils import get_featuresdict_from_dataset

from ..errors import UserError
from .features import (
    KID_SUBSET_SIZE,
    PRC_NEIGHBORHOOD,
    FeatureSpace,
    build_extractor,
    check_images,
    feature_space,
    to_rgb,
)

CACHE_TENSOR = "features"  # the one tensor of a cache file: reference features [M, D]


class UInt8Images(Dataset):
    """An in-memory image set for torch-fidelity: item i is uint8 [3, H, W] (grayscale replicated)."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # uint8 [N, C, H, W], C in {1, 3}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_rgb(self.images[index])


def reference_cache_name(reference: torch.Tensor, key: str) -> str:
    """Cache name for a reference set: `key` plus a digest of its pixels (a changed set misses)."""
    if not key or key.strip() != key or "/" in key or os.sep in key:
        raise UserError(f"The reference cache key must be a plain file-name stem, got {key!r}.")
    digest = hashlib.sha256(str(tuple(reference.shape)).encode())
    digest.update(reference.cpu().contiguous().numpy().tobytes())
    return f"{key}-{digest.hexdigest()[:16]}"


def minimum_samples(prc: bool) -> int:
    """Smallest set size the metrics accept: 2 for a covariance and unbiased KID, k + 1 for k-NN precision/recall."""
    return max(2, PRC_NEIGHBORHOOD + 1) if prc else 2


def features_of(images: torch.Tensor, extractor, space: FeatureSpace, batch_size: int, cuda: bool) -> torch.Tensor:
    """torch-fidelity's features [N, D] of uint8 images, exactly as calculate_metrics extracts them."""
    features = get_featuresdict_from_dataset(UInt8Images(images), extractor, batch_size, cuda, save_cpu_ram=True,
                                             verbose=False)  # fmt: skip
    return features[space.layer]


def read_cache(path: str) -> torch.Tensor | None:
    """Cached reference features, or None when the file is missing or unreadable (it is then recomputed)."""
    if not os.path.isfile(path):
        return None
    try:
        return load_file(path)[CACHE_TENSOR]
    except (SafetensorError, OSError, KeyError):
        return None


def write_cache(path: str, features: torch.Tensor) -> None:
    """Write features to a temporary name in the cache folder, fsync, rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file({CACHE_TENSOR: features.contiguous()}, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reference_features(reference, extractor, space, batch_size, cuda, cache_path: str | None) -> torch.Tensor:
    """Features of the reference set, read from / written to the safetensors cache when one is given."""
    cached = read_cache(cache_path) if cache_path else None
    if cached is not None and cached.shape[0] == len(reference):
        return cached
    features = features_of(reference, extractor, space, batch_size, cuda)
    if cache_path:
        write_cache(cache_path, features)
    return features


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
        cache_dir: cache folder for the reference features; giving it or `reference_cache_key` turns caching on
            (default folder $TORCH_HOME/fidelity_cache). Entries carry a digest of the reference pixels.
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
        raise UserError("At least one of fid, kid and prc must be requested.")
    check_images(generated, "generated images", minimum_samples(prc))
    check_images(reference, "reference images", minimum_samples(prc))
    if generated.shape[1] != reference.shape[1]:
        raise UserError(
            f"Generated images have {generated.shape[1]} channel(s) but reference images {reference.shape[1]}."
        )
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"torch-fidelity runs on 'cpu' or 'cuda' only, got {device}.")
    cache_path = None
    if cache_dir is not None or reference_cache_key is not None:
        root = cache_dir or os.path.join(os.path.dirname(torch.hub.get_dir()), "fidelity_cache")
        stem = reference_cache_name(reference, reference_cache_key or "reference")
        cache_path = os.path.join(root, f"{stem}-{space.name}-{space.layer}.safetensors")
    cuda = device.type == "cuda"
    extractor = build_extractor(space, weights_path, device)
    features_1 = features_of(generated, extractor, space, batch_size, cuda)
    features_2 = reference_features(reference, extractor, space, batch_size, cuda, cache_path)
    kid_subset_size = min(KID_SUBSET_SIZE, len(generated), len(reference))
    raw = {}
    if fid:
        stats = [fid_features_to_statistics(f) for f in (features_1, features_2)]
        raw.update(fid_statistics_to_metric(*stats, verbose=False))
    if kid:
        raw.update(kid_features_to_metric(features_1, features_2, kid_subset_size=kid_subset_size, verbose=False))
    if prc:
        raw.update(prc_features_to_metric(features_1, features_2, prc_neighborhood=PRC_NEIGHBORHOOD,
                                          save_cpu_ram=True, verbose=False))  # fmt: skip
    report = {"feature_extractor": space.name, "num_generated": len(generated), "num_reference": len(reference)}
    return report | metrics_from_fidelity(raw, kid_subset_size if kid else None)


def metrics_from_fidelity(raw: dict, kid_subset_size: int | None) -> dict:
    """Plain-named floats from torch-fidelity's result dict (only the metrics it computed)."""
    names = {
        "fid": KEY_METRIC_FID,
        "kid_mean": KEY_METRIC_KID_MEAN,
        "kid_std": KEY_METRIC_KID_STD,
        "precision": KEY_METRIC_PRECISION,
        "recall": KEY_METRIC_RECALL,
        "f_score": KEY_METRIC_F_SCORE,
    }
    out = {ours: float(raw[theirs]) for ours, theirs in names.items() if theirs in raw}
    if kid_subset_size is not None:
        out["kid_subset_size"] = kid_subset_size
    return out
