"""diffusers' ``save_pretrained`` on an elastic model keeps everything: the base weights in their original neuron
order, without router keys, where diffusers puts them, and the elastic artifact in ``<folder>/elastic/``.

Why: an elastic model's state dict holds its FFN units reordered and its routers under ``elastic_router.*``.
Written as they are, ``from_pretrained`` drops the routers with a warning and gives a base model whose neurons are
already reordered, which ``elastic_compile.load`` would reorder a second time. Written this way, diffusers'
own ``from_pretrained(folder)`` returns exactly the base model the elastic one was made from, and
``elastic_compile.from_pretrained(ModelClass, folder)`` (or ``load(model, folder / "elastic")``) makes it elastic.

:func:`install_save_pretrained` puts the method on the instance (the model keeps its class); ``transform`` and
``load`` call it for models that have a ``save_pretrained``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .passes import apply_unit_permutation
from .state import ROUTER_ATTRIBUTE, state_of

#: The subfolder of a ``save_pretrained`` folder holding the elastic artifact.
ELASTIC_SUBFOLDER = "elastic"


@contextlib.contextmanager
def as_base_model(model: nn.Module):
    """Inside: ``model``'s FFN units in their original order and its routers detached from the blocks (so
    ``state_dict`` is the base model's); both put back on exit. Each permutation is an exact reindexing."""
    state = state_of(model)
    sites = [(block, site, state.permutations[(spec.index, site.name)])
             for spec, block in zip(state.specs, state.blocks) for site in spec.sites]
    routers = []
    try:
        for block, site, order in sites:
            apply_unit_permutation(block, site, torch.argsort(order))
        for block in state.blocks:
            if ROUTER_ATTRIBUTE in block._modules:
                routers.append((block, block._modules.pop(ROUTER_ATTRIBUTE)))
        yield model
    finally:
        for block, router in routers:
            block._modules[ROUTER_ATTRIBUTE] = router
        for block, site, order in sites:
            apply_unit_permutation(block, site, order)


class ElasticSavePretrained:
    """``model.save_pretrained(folder, ...)``: diffusers' method on the base model's weights, then the artifact."""

    def __init__(self, model: nn.Module, save: Callable):
        self.model = model
        self.save = save

    def __call__(self, save_directory: str | os.PathLike, *args, **kwargs):
        model = self.model
        with as_base_model(model):
            result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        self.save(model, Path(save_directory) / ELASTIC_SUBFOLDER)
        return result


def install_save_pretrained(model: nn.Module, save: Callable) -> None:
    """Give ``model`` (when its class has ``save_pretrained``, as diffusers models do) the elastic version;
    ``save``: :func:`elastic_compile.save`."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = ElasticSavePretrained(model, save)
