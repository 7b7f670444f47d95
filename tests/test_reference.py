"""The reference data split, bundled model and classifier, and the quality metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elastic_compile.errors import ConfigError
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference, make_grid_png
from elastic_compile.reference.classifier import accuracy
from elastic_compile.reference.data import load_digits_split
from elastic_compile.reference.metrics import class_accuracy, fid, frechet_distance, psnr, ssim


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_split_is_deterministic_disjoint_and_stratified(split):
    again = load_digits_split()
    assert torch.equal(split.train_images, again.train_images)
    assert torch.equal(split.heldout_labels, again.heldout_labels)
    assert np.intersect1d(split.train_index, split.heldout_index).size == 0
    assert len(split.train_index) + len(split.heldout_index) == 1797
    assert split.train_images.shape[1:] == (1, 8, 8) and split.train_images.dtype == torch.float32
    assert split.train_labels.dtype == torch.int64
    assert split.train_images.min() == -1.0 and split.train_images.max() == 1.0
    fractions = torch.bincount(split.heldout_labels, minlength=10) / torch.bincount(
        torch.cat([split.train_labels, split.heldout_labels]), minlength=10)
    assert torch.all((fractions - 0.2).abs() < 0.01)
    other = load_digits_split(seed=1)
    assert not np.array_equal(other.heldout_index, split.heldout_index)


def test_split_rejects_bad_fraction():
    with pytest.raises(ConfigError):
        load_digits_split(heldout_fraction=1.5)


def test_bundled_classifier_is_accurate_on_heldout(split):
    classifier = load_classifier()
    assert accuracy(classifier, split.heldout_images, split.heldout_labels) >= 0.95


def test_bundled_model_loads_with_plain_diffusers():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(ASSETS_DIR / "transformer")
    assert model.config.num_embeds_ada_norm == 10 and model.config.norm_type == "ada_norm_zero"
    assert model.config.num_layers >= 8
    out = model(torch.zeros(2, 1, 8, 8), timestep=torch.tensor([500.0, 500.0]),
                class_labels=torch.tensor([3, 10]), return_dict=False)[0]
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_load_reference_returns_eval_model_scheduler_and_config():
    model, scheduler, config = load_reference()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert type(scheduler).__name__ == config.scheduler
    assert config.null_class == 10 and config.sample_size == 8 and config.in_channels == 1


def test_psnr_and_ssim_are_perfect_for_identical_images_and_drop_with_noise(split):
    images = split.heldout_images[:16]
    assert torch.isinf(psnr(images, images).values).all()
    assert torch.allclose(ssim(images, images).values, torch.ones(16))
    gen = torch.Generator().manual_seed(0)
    small = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
    large = (images + 0.5 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
    assert psnr(images, small).mean > psnr(images, large).mean > 0
    assert 1.0 > ssim(images, small).mean > ssim(images, large).mean
    # PSNR definition: range 2, MSE 0.01 -> 10 log10(4 / 0.01) = 26.02 dB.
    shifted = images + 0.1
    assert psnr(shifted, images).values[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)


def test_metric_shape_errors_are_typed(split):
    with pytest.raises(ConfigError):
        psnr(split.heldout_images[:2], split.heldout_images[:3])
    with pytest.raises(ConfigError):
        ssim(split.heldout_images[:2], split.heldout_images[:2], window_size=9)


def test_fid_is_zero_for_a_set_against_itself_and_large_against_noise(split):
    classifier = load_classifier()
    real = split.heldout_images
    assert fid(classifier, real, real) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real_vs_real = fid(classifier, split.train_images[:360], real)
    assert fid(classifier, noise, real) > 10 * real_vs_real


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    # |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = 5 + (1 + 1 + 0)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-9)


def test_class_accuracy_per_sample(split):
    classifier = load_classifier()
    result = class_accuracy(classifier, split.heldout_images[:20], split.heldout_labels[:20])
    assert result.values.shape == (20,) and set(result.values.tolist()) <= {0.0, 1.0}
    wrong = class_accuracy(classifier, split.heldout_images[:20], (split.heldout_labels[:20] + 1) % 10)
    assert wrong.mean < 0.2 < result.mean


def test_make_grid_png_writes_a_grayscale_image(tmp_path, split):
    from PIL import Image

    path = make_grid_png(split.heldout_images[:10], tmp_path / "grid.png", nrow=5, scale=2, pad=1)
    image = Image.open(path)
    assert image.mode == "L" and image.size == (5 * 17 + 1, 2 * 17 + 1)
