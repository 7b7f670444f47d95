"""How the sampling loop tells a stateful denoiser where it is.

A denoiser with per-generation state (a feature cache, router statistics, diffusers' cache hooks) needs
two things from the loop that drives it, exactly what diffusers pipelines provide:

1. a reset at the start of every generation, so nothing cached for one batch of images leaks into
   the next (diffusers pipelines reset in ``maybe_free_model_hooks()`` at the *end* of ``__call__``;
   :func:`~elastic_compile.sampling.sample` resets at the start *and* at the end, so a
   generation that raised half-way cannot poison the next one);
2. a named context around every denoiser call, one name per classifier-free-guidance branch, so state
   is kept per branch: ``"cond"`` and ``"uncond"`` when the branches run as two calls, ``"cond_uncond"``
   when they run as one concatenated batch (the names diffusers 0.42 pipelines use: Flux/Wan use
   "cond"/"uncond", LTX/CogVideoX use "cond_uncond").

:class:`SamplerHooks` is that interface (every method a no-op by default); :class:`DiffusersCacheHooks`
drives diffusers' ``HookRegistry`` caches (``apply_first_block_cache``, ``apply_taylorseer_cache``,
``apply_mag_cache``, ...) on any module, including models that are not a diffusers ``CacheMixin``
(``DiTTransformer2DModel`` is not one, so it has no ``cache_context`` method of its own).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError

#: Context name of the conditional branch when it runs alone.
BRANCH_COND = "cond"
#: Context name of the unconditional (null-class) branch when it runs alone.
BRANCH_UNCOND = "uncond"
#: Context name of one call that evaluates both branches, concatenated along the batch (cond first).
BRANCH_COND_UNCOND = "cond_uncond"


@dataclass(frozen=True)
class StepInfo:
    """Where the sampling loop is when it calls the denoiser.

    Attributes:
        step_index: 0-based index of the denoising step.
        num_inference_steps: number of denoising steps of this generation.
        timestep: the scheduler's timestep for this step, as passed to the denoiser (FlowMatch: sigma * 1000).
        sigma: the scheduler's noise level for this step, when the scheduler has ``sigmas`` (else None).
    """

    step_index: int
    num_inference_steps: int
    timestep: float
    sigma: float | None


class SamplerHooks:
    """Callbacks the sampling loop makes into a stateful denoiser. Subclass and override what you need.

    Call order within one :func:`~elastic_compile.sampling.sample` call::

        start_generation()
        for each step:  with branch(name, step): denoiser(...)     # once or twice per step
        end_generation()                                             # also when the loop raised

    Guarantees made by the loop: ``start_generation`` precedes every denoiser call of a generation;
    each denoiser call happens inside exactly one ``branch`` context; contexts never nest; names are
    :data:`BRANCH_COND`, :data:`BRANCH_UNCOND` or :data:`BRANCH_COND_UNCOND`.
    """

    def start_generation(self) -> None:
        """Forget all per-generation state (caches, counters). Called before the first denoiser call."""

    @contextlib.contextmanager
    def branch(self, name: str, step: StepInfo) -> Iterator[None]:
        """Context around one denoiser call of CFG branch ``name`` at ``step``."""
        yield

    def end_generation(self) -> None:
        """Called after the last denoiser call of a generation (also when the loop raised)."""


class DiffusersCacheHooks(SamplerHooks):
    """Drive diffusers' ``HookRegistry`` cache hooks (FirstBlockCache, TaylorSeer, MagCache, ...) on ``module``.

    ``start_generation`` / ``end_generation`` reset every stateful hook under ``module`` (what a diffusers
    pipeline's ``maybe_free_model_hooks`` does); ``branch`` sets a diffusers ``CacheContext`` carrying the
    branch name and the step position on every stateful hook, and clears it afterwards (what a pipeline's
    ``with transformer.cache_context("cond"): ...`` does). Works on ``CacheMixin`` models and on plain
    modules such as ``DiTTransformer2DModel`` that only carry hooks added by ``apply_*_cache``.

    Without a context, diffusers' stateful hooks raise "No cache context is set"; without a reset, a
    cache keeps the last generation's residuals and can skip blocks of the next generation's first step.
    """

    def __init__(self, module: torch.nn.Module):
        try:
            from diffusers.hooks import HookRegistry
        except ImportError as exc:  # pragma: no cover - diffusers is a dependency
            raise BackendUnavailableError("diffusers with diffusers.hooks", f"import failed: {exc}",
                                          "pip install 'diffusers>=0.35'.") from exc
        self.module = module
        self._registry = HookRegistry.check_if_exists_or_initialize(module)

    def start_generation(self) -> None:
        self._registry.reset_stateful_hooks(recurse=True)

    def end_generation(self) -> None:
        self._registry.reset_stateful_hooks(recurse=True)

    @contextlib.contextmanager
    def branch(self, name: str, step: StepInfo) -> Iterator[None]:
        self._set_context(name, step)
        try:
            yield
        finally:
            self._clear_context()

    def _set_context(self, name: str, step: StepInfo) -> None:
        try:  # diffusers >= 0.42: a CacheContext dataclass set on every stateful hook's StateManager.
            from diffusers.hooks.hooks import CacheContext, _set_cache_context
        except ImportError:  # older diffusers: the registry takes the bare name.
            self._registry._set_context(name)
            return
        context = CacheContext(name, step_index=step.step_index, num_inference_steps=step.num_inference_steps,
                               timestep=step.timestep, sigma=step.sigma)
        _set_cache_context(self.module, context)

    def _clear_context(self) -> None:
        try:
            from diffusers.hooks.hooks import _set_cache_context
        except ImportError:
            self._registry._set_context(None)
            return
        _set_cache_context(self.module, None)
