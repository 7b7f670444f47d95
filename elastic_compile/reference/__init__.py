"""The project's reference model: a small class-conditional diffusers DiT trained on 8x8 digits.

Bundled under ``elastic_compile/assets/reference/`` (diffusers ``save_pretrained`` folders, so any diffusers
user can ``DiTTransformer2DModel.from_pretrained(ASSETS_DIR / "transformer")``):

    transformer/   DiTTransformer2DModel weights + config (EMA weights, float32 safetensors)
    scheduler/     FlowMatchEulerDiscreteScheduler config
    sampling.json  default steps, guidance, image size, null class (:class:`SamplingConfig`)
    classifier/    the digit classifier that scores samples (safetensors + config json)
    train_log.jsonl, train_config.json   how the model was trained

Quick use::

    from elastic_compile.reference import load_reference
    from elastic_compile.sampling import sample
    model, scheduler, config = load_reference()
    images = sample(model, scheduler, [0, 1, 2], config, seed=0)   # (3, 1, 8, 8) in [-1, 1]
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ArtifactError
from ..sampling import SamplingConfig
from ..sampling.images import save_grid
from . import classifier

#: Folder holding the bundled reference assets (inside the installed package).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "reference"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ArtifactError(f"the bundled {what} at {path}", "nothing there",
                            "Reinstall elastic_compile, or run benchmarks/train_reference.py to recreate it.")
    return path


def load_reference(assets_dir: str | Path | None = None, *, device: torch.device | str = "cpu"):
    """Load the bundled reference model.

    Returns ``(transformer, scheduler, sampling_config)``: a ``DiTTransformer2DModel`` in eval mode with
    gradients disabled, a ``FlowMatchEulerDiscreteScheduler`` and a :class:`SamplingConfig`.
    """
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    root = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    model = DiTTransformer2DModel.from_pretrained(_require(root / "transformer", "reference transformer"),
                                                  low_cpu_mem_usage=False,  # no `accelerate` needed
                                                  use_safetensors=True)  # never a pickle
    model = model.to(device).eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(_require(root / "scheduler", "reference scheduler"))
    config = SamplingConfig.load(_require(root / "sampling.json", "sampling config"))
    return model, scheduler, config


def load_classifier(assets_dir: str | Path | None = None, *, device: torch.device | str = "cpu"):
    """Load the bundled digit classifier (eval mode, no gradients); see :mod:`.classifier`."""
    root = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    return classifier.load_classifier(_require(root / "classifier", "digit classifier"), device=device)


def make_grid_png(images: torch.Tensor, path: str | Path, nrow: int, *, scale: int = 4, pad: int = 1) -> Path:
    """Save (N, 1, H, W) images in [-1, 1] as one grayscale PNG, ``nrow`` images per row, each pixel a ``scale`` x
    ``scale`` square, images separated by ``pad`` pixels of mid-grey (:func:`elastic_compile.sampling.images.save_grid`).
    Returns the path written."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ArtifactError("images of shape (N, 1, H, W)", f"{tuple(images.shape)}", "Pass single-channel images.")
    return save_grid(images, path, nrow, scale=scale, pad=pad)


__all__ = ["ASSETS_DIR", "load_reference", "load_classifier", "make_grid_png", "SamplingConfig"]
