"""The one class-conditional sampling loop every benchmark and test reuses.

:func:`sample` runs a diffusers scheduler over any *denoiser*: a callable with the diffusers DiT
signature ``denoiser(hidden_states, timestep=..., class_labels=..., return_dict=False)`` returning a
tuple, an object with ``.sample`` or a tensor. That covers the dense ``DiTTransformer2DModel``, an elastic
model (same signature), a model carrying diffusers cache hooks and an exported runtime.

Determinism: sample ``i`` starts from noise drawn by its own ``torch.Generator`` seeded with ``seeds[i]``
(default ``seed + i``), so with a deterministic scheduler (FlowMatch Euler, DDIM with eta=0) a sample
does not depend on which other samples share its batch, up to floating-point differences of batched
matrix products. The caller's scheduler is never mutated (each generation works on a copy).
"""
from __future__ import annotations

import copy
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, ConfigError, DenoiserError
from .hooks import BRANCH_COND, BRANCH_COND_UNCOND, BRANCH_UNCOND, SamplerHooks, StepInfo

CFG_MODES = ("batch", "separate")
MAX_STEPS = 10_000  # beyond this a step count is a typo that would run for days


@dataclass(frozen=True)
class SamplingConfig:
    """How a class-conditional image denoiser is sampled by default (stored as ``sampling.json``).

    Attributes:
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale w; output = uncond + w * (cond - uncond).
            w == 1 means plain conditional sampling (the unconditional branch is not run).
        sample_size: image height and width in pixels.
        in_channels: image channels.
        num_classes: conditional classes 0..num_classes-1.
        null_class: class label of the unconditional branch (diffusers' DiT uses num_classes).
        scheduler: class name of the diffusers scheduler saved beside the model.
        prediction: what the denoiser predicts ("flow_velocity": noise - data, for FlowMatch schedulers).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 2.0
    sample_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    null_class: int = 10
    scheduler: str = "FlowMatchEulerDiscreteScheduler"
    prediction: str = "flow_velocity"

    def __post_init__(self):
        for name in ("num_inference_steps", "sample_size", "in_channels", "num_classes", "null_class"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} as an integer", repr(getattr(self, name)), "Fix sampling.json or the option.")
        if not isinstance(self.scheduler, str) or not isinstance(self.prediction, str):
            raise ConfigError("scheduler and prediction as strings", f"{self.scheduler!r}, {self.prediction!r}",
                              "Fix sampling.json.")
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise ConfigError(f"num_inference_steps in 1..{MAX_STEPS}", f"{self.num_inference_steps}", "Use e.g. 25.")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 <= scale < math.inf:
            raise ConfigError("guidance_scale: a finite number >= 0", f"{scale!r}",
                              "Use 1.0 for no guidance (NaN or infinity would make every image NaN).")
        if self.sample_size < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ConfigError("positive sample_size, in_channels, num_classes",
                              f"{self.sample_size}, {self.in_channels}, {self.num_classes}", "Fix sampling.json.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingConfig":
        if not isinstance(data, dict):
            raise ArtifactError("a sampling config as a JSON object", type(data).__name__, "Fix sampling.json.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"sampling config fields {sorted(known)}", f"unknown fields {unknown}",
                                "The file was written by a newer elastic_compile; upgrade.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SamplingConfig":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"a sampling config at {path}", "no such file", "Pass the folder holding sampling.json.")
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"JSON in {path}", f"{type(exc).__name__}: {exc}", "Fix or replace the file.") from exc
        return cls.from_dict(data)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal noise of shape (len(seeds), *shape); row i depends only on ``seeds[i]``.

    Each row is drawn on the CPU by ``torch.Generator().manual_seed(seeds[i])`` (so it is identical on every
    device), then moved to ``device`` / ``dtype``.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    if not rows:
        raise ConfigError("at least one seed", "none", "Pass one class label per image to generate.")
    return torch.stack(rows).to(device=device, dtype=dtype)


def denoiser_output(output: Any) -> torch.Tensor:
    """The prediction tensor inside a denoiser's output: ``out[0]`` of a tuple/list, ``out.sample``, or ``out``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "sample"):
        output = output.sample
    if not isinstance(output, torch.Tensor):
        raise DenoiserError("a tensor, a tuple starting with one, or an object with .sample",
                            f"{type(output).__name__}", "Make the denoiser follow the diffusers DiT output convention.")
    return output


def _model_device_dtype(denoiser: Callable) -> tuple[torch.device, torch.dtype]:
    if isinstance(denoiser, torch.nn.Module):
        for param in denoiser.parameters():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_labels(class_labels: Sequence[int] | torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    integral = (class_labels.dtype not in (torch.bool,) and not class_labels.is_floating_point()
                and not class_labels.is_complex()) if isinstance(class_labels, torch.Tensor) else \
        all(_is_int(c) for c in class_labels)
    if not integral:  # a cast to long would turn 1.7 into class 1 without a word
        raise ConfigError("integer class labels", f"{class_labels!r}"[:200], "Pass whole class numbers, e.g. 0,1,2.")
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if labels.numel() == 0:
        raise ConfigError("at least one class label", "none", "Pass one class label per image to generate.")
    bad = labels[(labels < 0) | (labels > config.null_class)]
    if bad.numel():
        raise ConfigError(f"class labels in 0..{config.num_classes - 1} (or the null class {config.null_class})",
                          f"{bad.tolist()[:8]}", "Use labels the model was trained on.")
    return labels


def _call(denoiser: Callable, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = denoiser_output(denoiser(x, timestep=t, class_labels=labels, return_dict=False))
    if out.shape != x.shape:
        raise DenoiserError(f"a prediction shaped like its input {tuple(x.shape)}", f"{tuple(out.shape)}",
                            "Check the denoiser's in/out channels and sample size.")
    return out


def sample(
    denoiser: Callable,
    scheduler: Any,
    class_labels: Sequence[int] | torch.Tensor,
    config: SamplingConfig,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    cfg: str = "batch",
    hooks: SamplerHooks | None = None,
    on_step_end: Callable[[StepInfo, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    differentiable: bool = False,
) -> torch.Tensor:
    """Generate one image per class label with classifier-free guidance; returns (B, C, H, W) in [-1, 1].

    Args:
        denoiser: ``denoiser(x, timestep=t, class_labels=y, return_dict=False)``; t has shape (B,).
        scheduler: a diffusers scheduler (copied, never mutated).
        class_labels: B labels in 0..num_classes-1 (``config.null_class`` gives unconditional samples).
        config: defaults for steps, guidance, image shape and the null class.
        seed, seeds: sample i starts from noise seeded by ``seeds[i]``; default ``seeds = seed + i``.
        latents: explicit initial noise (B, C, H, W) instead of seeded noise.
        num_inference_steps, guidance_scale: override ``config``.
        cfg: "batch" (cond and uncond rows concatenated, cond first, one call per step, context "cond_uncond")
            or "separate" (two calls per step, contexts "cond" then "uncond"). Ignored when guidance is 1.
        hooks: per-generation reset and per-branch context for stateful denoisers (see :mod:`.hooks`).
        on_step_end: called after every scheduler step with the step and the new latents (B, C, H, W).
        device, dtype: where the loop runs; default: the denoiser's first parameter, else CPU float32.
        progress: show a tqdm bar.
        differentiable: keep the autograd graph (rollout training backpropagates through whole generations);
            by default the loop runs without gradients.

    Guarantees: identical inputs give bit-identical outputs; ``cfg="batch"`` and ``cfg="separate"`` agree up
    to floating-point batching differences; guidance 1 runs only the conditional branch; outputs are
    clamped to [-1, 1].
    """
    with torch.set_grad_enabled(bool(differentiable) and torch.is_grad_enabled()):
        steps = config.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = config.guidance_scale if guidance_scale is None else guidance_scale  # both checked by SamplingConfig
        config = SamplingConfig(**{**config.to_dict(), "num_inference_steps": steps, "guidance_scale": scale})
        if cfg not in CFG_MODES:
            raise ConfigError(f"cfg in {CFG_MODES}", repr(cfg), "Use 'batch' (one call per step) or 'separate'.")
        labels = _as_labels(class_labels, config)
        batch = labels.numel()
        model_device, model_dtype = _model_device_dtype(denoiser)
        device = torch.device(device) if device is not None else model_device
        dtype = dtype or model_dtype
        shape = (config.in_channels, config.sample_size, config.sample_size)

        if latents is None:
            if seeds is None:
                seeds = [seed + i for i in range(batch)]
            if len(seeds) != batch:
                raise ConfigError(f"{batch} seeds (one per class label)", f"{len(seeds)}", "Pass one seed per label.")
            latents = initial_noise(seeds, shape, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != (batch, *shape):
            raise ConfigError(f"latents of shape {(batch, *shape)}", f"{tuple(latents.shape)}",
                              "Pass one noise image per class label, shaped like the model's input.")

        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(steps, device=device)
        x = latents.to(device=device, dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
        labels = labels.to(device)
        null = torch.full_like(labels, config.null_class)
        guided = scale != 1.0
        hooks = hooks or SamplerHooks()
        sigmas = getattr(scheduler, "sigmas", None)

        timesteps = scheduler.timesteps
        iterator = enumerate(timesteps)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(timesteps), desc="sampling")
        hooks.start_generation()
        try:
            for index, t in iterator:
                step = StepInfo(index, len(timesteps), float(t), float(sigmas[index]) if sigmas is not None else None)
                model_in = x
                if hasattr(scheduler, "scale_model_input"):
                    model_in = scheduler.scale_model_input(x, t)
                model_in = model_in.to(dtype)
                t_batch = t.to(device=device).expand(batch)
                if not guided:
                    with hooks.branch(BRANCH_COND, step):
                        prediction = _call(denoiser, model_in, t_batch, labels).float()
                elif cfg == "batch":
                    with hooks.branch(BRANCH_COND_UNCOND, step):
                        both = _call(denoiser, torch.cat([model_in, model_in]), torch.cat([t_batch, t_batch]),
                                     torch.cat([labels, null])).float()
                    cond, uncond = both.chunk(2)
                    prediction = uncond + scale * (cond - uncond)
                else:
                    with hooks.branch(BRANCH_COND, step):
                        cond = _call(denoiser, model_in, t_batch, labels).float()
                    with hooks.branch(BRANCH_UNCOND, step):
                        uncond = _call(denoiser, model_in, t_batch, null).float()
                    prediction = uncond + scale * (cond - uncond)
                x = scheduler.step(prediction, t, x, return_dict=False)[0].float()
                if on_step_end is not None:
                    on_step_end(step, x)
        finally:
            hooks.end_generation()
        return x.clamp(-1.0, 1.0)
