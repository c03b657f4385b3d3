"""Image-quality metrics: Fréchet distance math and the feature spaces (EfficientNet-Lite0, Inception) it runs in."""

from scm_distill.metrics.features import (
    EFFICIENTNET_LITE0,
    FEATURE_SPACES,
    INCEPTION_V3,
    EfficientNetLite0Extractor,
    FeatureSpace,
    extract_features,
    feature_space,
    load_efficientnet_lite0,
    resolve_feature_extractor,
)
from scm_distill.metrics.fidelity import compute_metrics
from scm_distill.metrics.frechet import feature_statistics, frechet_distance

__all__ = [
    "EFFICIENTNET_LITE0",
    "FEATURE_SPACES",
    "INCEPTION_V3",
    "EfficientNetLite0Extractor",
    "FeatureSpace",
    "compute_metrics",
    "extract_features",
    "feature_space",
    "feature_statistics",
    "frechet_distance",
    "load_efficientnet_lite0",
    "resolve_feature_extractor",
]
