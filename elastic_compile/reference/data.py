"""The reference data set: scikit-learn's bundled 8x8 handwritten digits, with one fixed split.

``sklearn.datasets.load_digits()`` ships 1797 real digits (values 0..16, 10 classes) inside the
scikit-learn wheel, so this works offline. Every model of the project (the reference DiT, the classifier
that scores it) trains on the same *train* split; every quality number is measured against the
*held-out* split, which no model has seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

#: Seed of the stratified split. Changing it changes every committed number: don't.
SPLIT_SEED = 20_240_531
#: Fraction of each class that is held out.
HELDOUT_FRACTION = 0.2
#: Pixel maximum in ``load_digits`` (values are integers 0..16).
DIGITS_MAX_VALUE = 16.0
NUM_CLASSES = 10
IMAGE_SIZE = 8


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out digits.

    Images are float32 tensors of shape (N, 1, 8, 8) with values in [-1, 1] (0 -> -1, 16 -> +1);
    labels are int64 tensors of shape (N,) with values 0..9. ``train_index`` / ``heldout_index`` are
    the rows of ``load_digits()`` each part came from (disjoint, together all 1797 rows).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    train_index: np.ndarray
    heldout_index: np.ndarray


def digits_to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """Map raw ``load_digits`` pixel rows (N, 64), values 0..16, to float32 images (N, 1, 8, 8) in [-1, 1]."""
    images = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images / (DIGITS_MAX_VALUE / 2.0) - 1.0


def unit_range_to_digits(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`digits_to_unit_range` (no rounding): [-1, 1] -> [0, 16]."""
    return (images + 1.0) * (DIGITS_MAX_VALUE / 2.0)


def load_digits_split(seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION) -> DigitsSplit:
    """Load the digits and split them, stratified by class, reproducibly.

    Guarantees: the same ``seed`` and ``heldout_fraction`` give bit-identical tensors on every call and
    machine (the permutation comes from a seeded NumPy ``Generator``, independent of scikit-learn's RNG);
    the two parts are disjoint; each class is held out in proportion ``heldout_fraction`` (rounded per
    class); rows keep ascending ``load_digits`` order within each part.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError("heldout_fraction in (0, 1)", f"{heldout_fraction}", "Use e.g. 0.2.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    heldout_rows: list[np.ndarray] = []
    for cls in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == cls)
        count = int(round(len(rows) * heldout_fraction))
        heldout_rows.append(rng.permutation(rows)[:count])
    heldout_index = np.sort(np.concatenate(heldout_rows))
    train_index = np.setdiff1d(np.arange(len(labels)), heldout_index)

    images = digits_to_unit_range(digits.data)
    label_tensor = torch.as_tensor(labels)
    return DigitsSplit(
        train_images=images[train_index].contiguous(),
        train_labels=label_tensor[train_index].contiguous(),
        heldout_images=images[heldout_index].contiguous(),
        heldout_labels=label_tensor[heldout_index].contiguous(),
        train_index=train_index,
        heldout_index=heldout_index,
    )
