"""Quality metrics for generated digits.

* class accuracy: does the bundled classifier see the requested class?
* FID: Frechet distance between Gaussian fits of the classifier's penultimate features of two image sets
  (``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))``), normally generated samples vs held-out real digits.
  Values are only comparable at equal set sizes (FID is biased upwards for small sets).
* PSNR / SSIM of each sample against a reference sample made from the same noise and class (e.g. the dense
  model's sample vs an elastic model's): fidelity to the reference, not realism.

All functions take images of shape (N, 1, H, W) in [-1, 1] and return per-sample values plus their mean
where that makes sense (:class:`PerSample`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: Range of images in [-1, 1].
DATA_RANGE = 2.0


@dataclass(frozen=True)
class PerSample:
    """A metric's value for every sample (``values``, shape (N,)) and their mean (``mean``)."""

    values: torch.Tensor
    mean: float


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ConfigError(f"{name} as a (N, C, H, W) tensor", f"{getattr(images, 'shape', type(images).__name__)}",
                          "Pass a batch of images in [-1, 1].")


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    _check_images(images, "images")
    _check_images(reference, "reference")
    if images.shape != reference.shape:
        raise ConfigError("images and reference of the same shape", f"{tuple(images.shape)} vs {tuple(reference.shape)}",
                          "Compare each sample with the reference made from the same noise and class.")


@torch.no_grad()
def predicted_classes(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Argmax class of each image, shape (N,)."""
    _check_images(images, "images")
    classifier.eval()
    return torch.cat([classifier(images[i:i + batch_size].float()).argmax(1) for i in range(0, len(images), batch_size)])


def class_accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> PerSample:
    """1.0 where the classifier predicts ``labels[i]`` for ``images[i]``, else 0.0; mean = accuracy."""
    labels = torch.as_tensor(labels).flatten()
    if len(labels) != len(images):
        raise ConfigError(f"{len(images)} labels", f"{len(labels)}", "Pass the class each image was generated for.")
    correct = (predicted_classes(classifier, images).cpu() == labels.cpu()).float()
    return PerSample(correct, correct.mean().item())


@torch.no_grad()
def classifier_features(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate features ``classifier.features(images)`` as a float64 array (N, D)."""
    _check_images(images, "images")
    classifier.eval()
    feats = [classifier.features(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).double().cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` with ``scipy.linalg.sqrtm``.

    A singular product (non-finite square root) is retried with ``eps * I`` added to both covariances.
    Imaginary parts from round-off are dropped; if they are not tiny a warning says so.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected (dead ReLU features); checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imag = np.max(np.abs(covmean.imag))
        if largest_imag > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
            warnings.warn(f"FID: sqrtm has a non-negligible imaginary part ({largest_imag:.3g}); using the real part.")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D); needs N >= 2."""
    if features.shape[0] < 2:
        raise ConfigError("at least 2 images for FID", f"{features.shape[0]}", "Generate more samples.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(classifier: torch.nn.Module, images: torch.Tensor, real_images: torch.Tensor) -> float:
    """FID between ``images`` and ``real_images`` in the classifier's penultimate feature space."""
    mu1, s1 = feature_statistics(classifier_features(classifier, images))
    mu2, s2 = feature_statistics(classifier_features(classifier, real_images))
    return frechet_distance(mu1, s1, mu2, s2)


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> PerSample:
    """Per-sample PSNR in dB, ``10 log10(range^2 / MSE)``; +inf for identical images (so may the mean be)."""
    _check_pair(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    values = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf
    return PerSample(values.float(), values.mean().item())


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-coords ** 2 / (2.0 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE, window_size: int = 5,
         sigma: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> PerSample:
    """Per-sample SSIM (Wang et al. 2004) with a Gaussian window, valid filtering, averaged over the map.

    The classic 11x11 / sigma 1.5 window does not fit an 8x8 image; the default 5x5 / sigma 1.0 window gives a
    4x4 SSIM map per 8x8 image. Identical images give exactly 1.0. Channels are averaged.
    """
    _check_pair(images, reference)
    if window_size > min(images.shape[-2:]):
        raise ConfigError(f"window_size <= image size {min(images.shape[-2:])}", f"{window_size}",
                          "Use a smaller SSIM window for small images.")
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x.device).expand(channels, 1, window_size, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    values = ssim_map.flatten(1).mean(1)
    return PerSample(values.float(), values.mean().item())


def finite_mean(values: torch.Tensor) -> float:
    """Mean of the finite entries (e.g. PSNR without the +inf of identical samples); nan if there are none."""
    finite = values[torch.isfinite(values)]
    return finite.double().mean().item() if finite.numel() else math.nan


def nearest_neighbour_rmse(images: torch.Tensor, reference_set: torch.Tensor) -> PerSample:
    """Per-sample RMSE to the closest image of ``reference_set`` (e.g. the training data).

    A memorising generator gives values near 0; compare with the same number for real held-out images.
    """
    _check_images(images, "images")
    _check_images(reference_set, "reference_set")
    a, b = images.flatten(1).double(), reference_set.flatten(1).double()
    if a.shape[1] != b.shape[1]:
        raise ConfigError("images shaped like the reference set", f"{tuple(images.shape)} vs {tuple(reference_set.shape)}",
                          "Compare images of the same size.")
    values = torch.cdist(a, b).min(dim=1).values / a.shape[1] ** 0.5
    return PerSample(values.float(), values.mean().item())
