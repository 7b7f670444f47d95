"""Generate and score digits: what the demo, the router benchmark and the quality benchmark share.

``generate`` runs the project's sampler on any denoiser, optionally tracking an elastic model's executed FLOP
fraction per step and per image; ``measure_flops`` counts the FLOPs of a whole generation with
``analysis.flop_counter`` (works for every method, caches included); ``score`` gives class accuracy, FID and
fidelity to dense.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..analysis.flop_counter import flop_counter
from ..sampling import SamplingConfig, sample
from ..state import STATE_ATTRIBUTE
from ..stats import StepStats
from .metrics import class_accuracy, fid, psnr, ssim


@dataclass
class Generation:
    images: torch.Tensor
    seconds: float
    executed_fraction: float | None = None      # elastic models: mean over denoiser calls
    per_image_fraction: torch.Tensor | None = None  # elastic models: (N,) mean over steps and CFG rows


def generate(denoiser: Callable, scheduler, labels: list[int], config: SamplingConfig, *, seed: int = 0,
             hooks=None, cfg: str = "batch", batch_size: int = 100, progress: bool = False) -> Generation:
    """Images for ``labels`` (sample i seeded ``seed + i``), in batches, with per-step elastic statistics."""
    elastic = hasattr(denoiser, STATE_ATTRIBUTE)
    images, fractions, per_image = [], [], []
    start = time.perf_counter()
    for first in range(0, len(labels), batch_size):
        chunk = labels[first:first + batch_size]
        steps = StepStats(denoiser) if elastic else None
        images.append(sample(denoiser, scheduler, chunk, config, seeds=[seed + first + i for i in range(len(chunk))],
                             hooks=hooks, cfg=cfg, on_step_end=steps, progress=progress))
        if elastic and steps.steps:
            fractions += [s.executed_flops_fraction for s in steps.steps]
            table = torch.stack([torch.tensor(s.per_sample_flops_fraction) for s in steps.steps])  # (steps, rows)
            per_image.append(table.reshape(len(steps.steps), -1, len(chunk)).mean(dim=(0, 1)))
    seconds = time.perf_counter() - start
    if not elastic:
        return Generation(torch.cat(images), seconds)
    return Generation(torch.cat(images), seconds, sum(fractions) / len(fractions), torch.cat(per_image))


def measure_flops(denoiser: Callable, scheduler, labels: list[int], config: SamplingConfig, *, seed: int = 0,
                  hooks=None, cfg: str = "batch") -> int:
    """FLOPs of generating ``labels`` (``analysis.flop_counter``: matmuls, convolutions, attention)."""
    with flop_counter() as counter:
        sample(denoiser, scheduler, labels, config, seeds=[seed + i for i in range(len(labels))], hooks=hooks, cfg=cfg)
    return counter.get_total_flops()


def score(images: torch.Tensor, labels: list[int], classifier, real_images: torch.Tensor,
          dense_images: torch.Tensor | None = None) -> dict[str, float]:
    """Class accuracy and classifier-feature FID; PSNR and SSIM against the dense images when given."""
    result = {"accuracy": class_accuracy(classifier, images, torch.tensor(labels)).mean,
              "fid": fid(classifier, images, real_images)}
    if dense_images is not None:
        result["psnr"] = psnr(images, dense_images).mean
        result["ssim"] = ssim(images, dense_images).mean
    return result
