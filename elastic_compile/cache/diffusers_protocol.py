"""The feature cache spoken in diffusers' cache protocol, so a diffusers pipeline drives it with no toolkit code.

Why: diffusers pipelines talk to their denoiser's caches through the model's hook registry: Flux-style pipelines
wrap each branch's call in ``transformer.cache_context("cond")`` / ``("uncond")``, and every pipeline ends with
``maybe_free_model_hooks()``, which calls ``transformer._reset_stateful_cache()``. ``apply_feature_cache`` on a
diffusers model with that protocol (``CacheMixin``) therefore registers :class:`ElasticCacheHook`, a stateful
diffusers ``ModelHook``:

* ``model.cache_context(name)`` sets the elastic cache's context to ``name`` for the calling thread (through the
  hook's :class:`ElasticContextSwitch`, which diffusers finds as one of the hook's state managers), and clears it
  on exit: the branches' cached updates stay apart, as with ``elastic_compile.cache_context``;
* ``model._reset_stateful_cache()`` (the end of every pipeline call) forgets the calling thread's cached updates;
* calls outside any context (DiTPipeline, PixArtAlphaPipeline: models without ``cache_context``, pipelines that
  call neither) get one from their timestep (:mod:`.plain_calls`, installed on every diffusers model): one context
  per call at a timestep, a reset when a new generation starts. The context ``cache_context`` sets is cleared (not
  restored) on exit, as diffusers does for its own hooks.

On and off: ``apply_feature_cache`` / ``remove_feature_cache`` (which also removes the hook). The hook is not one
of diffusers' cache configurations, so ``model.enable_cache(FirstBlockCacheConfig(...))`` and ``disable_cache()``
work beside it and leave it in place. With both on, the first-block cache decides per step whether the blocks
after the first run at all (for the whole batch), and the elastic gates decide, per sample, how the blocks that
do run are run; both keep their state per context name and both are reset by ``_reset_stateful_cache``.

:func:`profiling_hooks` lets the FLOP profiler (``ec.stats``) run a forward under other diffusers hooks: stateful
ones (which raise outside a cache context) without touching their state in the user's contexts, layerwise
casting (which cannot convert weights in place on shape-only tensors), and group offloading (whose onload and
offload assign ``param.data``: on shape-only tensors that would leave the model's real weights as shapes).
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..offloading import offloading_paused
from ..state import state_of
from .context import reset_cache

#: The name of the elastic cache's hook in a diffusers model's HookRegistry.
HOOK_NAME = "elastic_feature_cache"
#: The context name of the FLOP profiler's forward in other stateful hooks (dropped afterwards).
PROFILE_CONTEXT = "elastic-compile-flop-profile"


def install_protocol_hook(model: nn.Module) -> None:
    """Register :class:`ElasticCacheHook` in ``model``'s diffusers HookRegistry (idempotent)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is None:
        registry.register_hook(_hook_class()(), HOOK_NAME)


def remove_protocol_hook(model: nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


_CLASSES: dict = {}


def _hook_class():
    """:class:`ElasticCacheHook`, defined on first use (diffusers is imported only for diffusers models)."""
    if "hook" not in _CLASSES:
        from diffusers.hooks import ModelHook
        from diffusers.hooks.hooks import StateManager

        class ElasticContextSwitch(StateManager):
            """Receives ``cache_context``'s context (diffusers sets it on every state manager of a stateful hook)
            and makes its name the elastic cache's context for the calling thread; holds no state itself."""

            def __init__(self):
                super().__init__(dict)
                self.model = None

            def set_context(self, context) -> None:
                cache = state_of(self.model).cache if self.model is not None else None
                if cache is not None:
                    cache.context = None if context is None else context.name

            def reset(self, *args, **kwargs) -> None:
                if self.model is not None:
                    reset_cache(self.model)

        class ElasticCacheHook(ModelHook):
            """The elastic feature cache in a diffusers model's hook registry (see the module docstring)."""

            _is_stateful = True

            def __init__(self):
                super().__init__()
                self.contexts = ElasticContextSwitch()

            def initialize_hook(self, module):
                self.contexts.model = module
                return module

            def reset_state(self, module):
                reset_cache(module)
                return module

        _CLASSES["hook"], _CLASSES["switch"] = ElasticCacheHook, ElasticContextSwitch
    return _CLASSES["hook"]


@contextlib.contextmanager
def listening_to_cache_context(model: nn.Module, listener):
    """Within, ``listener(name)`` hears every ``model.cache_context(name)`` (and ``listener(None)`` when one ends),
    through a stateful diffusers hook registered for the duration, as the pipeline's own caches hear it. A no-op on
    models without diffusers' cache protocol (their calls carry no context name)."""
    if not hasattr(model, "cache_context"):
        yield
        return
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import StateManager

    class Listener(StateManager):
        def __init__(self):
            super().__init__(dict)

        def set_context(self, context) -> None:
            listener(None if context is None else context.name)

    class ListeningHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.contexts = Listener()

        def reset_state(self, module):   # holds no state: the pipeline's end-of-call reset has nothing to clear
            return module

    name = f"elastic_context_listener_{id(listener)}"
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(ListeningHook(), name)
    try:
        yield
    finally:
        registry.remove_hook(name, recurse=False)


@contextlib.contextmanager
def profiling_hooks(model: nn.Module, shape_only: bool = True):
    """Within, for the FLOP profiler's forward: other stateful diffusers hooks under ``model`` (first-block cache,
    ...) see a context of their own (:data:`PROFILE_CONTEXT`, so they run the model as on a first step), and
    layerwise casting gives each module compute-dtype copies of its weights instead of converting them in place
    (which fails on shape-only tensors). With ``shape_only`` (the forward runs under ``FakeTensorMode``), group
    offloading moves no weights (:func:`~elastic_compile.offloading.offloading_paused`). After: the hooks as
    before, the profile context's state dropped. A no-op on models without diffusers hooks."""
    registries = [module._diffusers_hook for module in model.modules() if hasattr(module, "_diffusers_hook")] \
        if isinstance(model, nn.Module) else []
    if not registries:
        yield
        return
    from diffusers.hooks.hooks import CacheContext, StateManager

    switch = _CLASSES.get("switch")
    hooks = [hook for registry in registries for hook in registry.hooks.values()]
    managers = [attr for hook in hooks if hook._is_stateful for attr in vars(hook).values()
                if isinstance(attr, StateManager) and not (switch is not None and isinstance(attr, switch))]
    castings = [hook for hook in hooks if hasattr(hook, "compute_dtype") and hasattr(hook, "storage_dtype")
                and getattr(hook, "fn_ref", None) is not None]
    previous = [manager._context for manager in managers]
    replaced = [(hook.fn_ref, hook.fn_ref.pre_forward, hook.fn_ref.post_forward) for hook in castings]
    for manager in managers:
        manager.set_context(CacheContext(PROFILE_CONTEXT))
    for hook in castings:
        hook.fn_ref.pre_forward, hook.fn_ref.post_forward = _cast_copies(hook.compute_dtype)
    try:
        with offloading_paused(model, hooks) if shape_only else contextlib.nullcontext():
            yield
    finally:
        for fn_ref, pre_forward, post_forward in replaced:
            fn_ref.pre_forward, fn_ref.post_forward = pre_forward, post_forward
        for manager, context in zip(managers, previous):
            manager.set_context(context)
            state = manager._state_cache.pop(PROFILE_CONTEXT, None)
            if state is not None and hasattr(state, "reset"):
                state.reset()


def _cast_copies(dtype):
    """A casting hook's ``(pre_forward, post_forward)`` that lend the module compute-dtype copies of its floating
    parameters for one call (its own parameters stay as they are)."""
    stored: list[dict] = []

    def pre_forward(module, *args, **kwargs):
        originals = dict(module._parameters)
        stored.append(originals)
        for name, parameter in originals.items():
            if parameter is not None and parameter.is_floating_point():
                module._parameters[name] = parameter.detach().to(dtype)
        return args, kwargs

    def post_forward(module, output):
        module._parameters.update(stored.pop())
        return output

    return pre_forward, post_forward
