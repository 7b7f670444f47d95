"""A small CNN that classifies 8x8 digits; it scores generated samples (class accuracy) and provides the
feature space of the project's FID (its penultimate layer).

It trains on the same *train* split as the reference DiT (:func:`~.data.load_digits_split`) and is measured
on the held-out split. Saved as ``classifier/model.safetensors`` + ``classifier/config.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArtifactError
from .data import DigitsSplit

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a :class:`DigitClassifier`."""

    in_channels: int = 1
    image_size: int = 8
    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 64
    num_classes: int = 10
    dropout: float = 0.2


class DigitClassifier(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool2 -> flatten -> Linear(feature_dim) -> ReLU -> Linear(classes).

    ``features(x)`` is the ReLU output before the last Linear (the FID feature space); ``forward(x)`` returns
    logits. Input: (B, 1, 8, 8) images in [-1, 1].
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        pooled = config.image_size // 2
        self.fc = nn.Linear(c2 * pooled * pooled, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape (B, feature_dim)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose argmax class equals ``labels`` (model put in eval mode)."""
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(split: DigitsSplit, *, seed: int = 0, epochs: int = 60, batch_size: int = 64,
                     lr: float = 2e-3, shift_probability: float = 0.5,
                     config: ClassifierConfig = ClassifierConfig()) -> tuple[DigitClassifier, dict]:
    """Train a :class:`DigitClassifier` on ``split``'s train part, reproducibly from ``seed``.

    Half of the training images (``shift_probability``) are shifted by one pixel, so the classifier does not
    depend on exact centring (generated digits are not perfectly centred). Returns the model (eval mode) and
    a report with train and held-out accuracy.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = DigitClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(split.train_labels) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(split.train_labels), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = split.train_images[idx], split.train_labels[idx]
            shift = torch.rand(len(idx), generator=gen) < shift_probability
            if shift.any():
                x = x.clone()
                x[shift] = random_shift(x[shift], gen)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    report = {"train_accuracy": accuracy(model, split.train_images, split.train_labels),
              "heldout_accuracy": accuracy(model, split.heldout_images, split.heldout_labels),
              "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "shift_probability": shift_probability}
    return model, report


def save_classifier(model: DigitClassifier, directory: str | Path, report: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``report``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_NAME))
    payload = {"architecture": asdict(model.config), "training": report or {}}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path, *, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier`; eval mode, gradients disabled."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        raise ArtifactError(f"{WEIGHTS_NAME} and {CONFIG_NAME} in {directory}", "missing files",
                            "Run benchmarks/train_classifier.py to recreate the classifier.")
    arch = json.loads((directory / CONFIG_NAME).read_text())["architecture"]
    arch["channels"] = tuple(arch["channels"])
    model = DigitClassifier(ClassifierConfig(**arch))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.to(device).eval().requires_grad_(False)
