"""Fréchet distance between Gaussians fitted to two feature sets (the formula behind FID).

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})

(Dowson & Landau 1982; used as FID by Heusel et al., arXiv 1706.08500v6.)

Tr (Sigma_1 Sigma_2)^{1/2} is the sum of the square roots of the eigenvalues of Sigma_1 Sigma_2. With
A = Sigma_1^{1/2}, Sigma_1 Sigma_2 = A (A Sigma_2) and A Sigma_2 A = (A Sigma_2) A share their eigenvalues
(XY and YX always do), and A Sigma_2 A is symmetric positive semi-definite. Working with that symmetric form via
`eigh` gives real, non-negative eigenvalues up to rounding, so there is no imaginary part to discard and no
epsilon offset is needed for the singular covariances of N < D feature sets (where `scipy.linalg.sqrtm` of the
non-symmetric product struggles). All arithmetic is float64.
"""

import numpy as np

from ..errors import UserError

# Relative size (to the largest eigenvalue) below which a negative eigenvalue counts as rounding noise.
PSD_TOLERANCE = 1e-8

# Relative asymmetry ||S - S^T||_max / ||S||_max accepted in a covariance matrix.
SYMMETRY_TOLERANCE = 1e-8


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean mu [D] and unbiased covariance Sigma [D, D] (float64) of features [N, D], N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"Features must be a 2-D array [N, D], got shape {x.shape}.")
    if x.shape[0] < 2:
        raise UserError(f"Feature statistics need at least 2 samples (for a covariance), got {x.shape[0]}.")
    if not np.isfinite(x).all():
        raise UserError("Features contain NaN or infinite values.")
    mu = x.mean(axis=0)
    centered = x - mu
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring formula)."""
    mu1, sigma1 = _checked_gaussian(mu1, sigma1, "first")
    mu2, sigma2 = _checked_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise UserError(f"The two Gaussians have different dimensions ({mu1.shape[0]} and {mu2.shape[0]}).")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # rounding can leave a value like -1e-12 for identical statistics; a squared distance is >= 0
    return max(float(value), 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (sigma1 sigma2)^{1/2} through the symmetric form Tr (A sigma2 A)^{1/2}, A = sigma1^{1/2}."""
    a = psd_sqrt(sigma1, "first covariance")
    m = a @ sigma2 @ a
    eigenvalues = _psd_eigenvalues((m + m.T) / 2, "second covariance")
    return float(np.sqrt(eigenvalues).sum())


def psd_sqrt(sigma: np.ndarray, name: str = "matrix") -> np.ndarray:
    """Symmetric square root V diag(sqrt(lambda)) V^T of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    eigenvalues = _clip_rounding(eigenvalues, name)
    return (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T


def _psd_eigenvalues(matrix: np.ndarray, name: str) -> np.ndarray:
    # eigenvalues of a symmetric PSD matrix, rounding-level negatives set to 0
    return _clip_rounding(np.linalg.eigvalsh(matrix), name)


def _clip_rounding(eigenvalues: np.ndarray, name: str) -> np.ndarray:
    # negatives within PSD_TOLERANCE of the spectrum's scale are rounding noise; larger ones are an input error
    scale = max(float(np.abs(eigenvalues).max(initial=0.0)), np.finfo(np.float64).tiny)
    if eigenvalues.min(initial=0.0) < -PSD_TOLERANCE * scale:
        raise UserError(f"The {name} is not positive semi-definite (eigenvalue {eigenvalues.min():.3g}).")
    return np.clip(eigenvalues, 0.0, None)


def _checked_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    # float64 copies of (mu [D], sigma [D, D]) after shape, finiteness and symmetry checks
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"The {which} Gaussian needs mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"The {which} Gaussian's statistics contain NaN or infinite values.")
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max(initial=0.0) > SYMMETRY_TOLERANCE * scale:
        raise UserError(f"The {which} covariance matrix is not symmetric.")
    return mu, sigma
