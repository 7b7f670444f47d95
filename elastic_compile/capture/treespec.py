"""Pytree structures (``TreeSpec``) held by the rewritten model and the runtime, kept as their serialized form.

Objects here store a structure as its ``treespec_dumps`` string and read it back through :func:`loaded_treespec`,
one ``TreeSpec`` per distinct string per process. Why not keep the ``TreeSpec`` itself: copying one
(``copy.deepcopy`` of a transformed model, pickling) rebuilds its leaves through torch's deprecated ``LeafSpec``
class, which emits a ``FutureWarning`` per leaf (torch 2.13); a string copies silently and the loaded structure is
immutable, so sharing it is safe.
"""
from __future__ import annotations

import functools

import torch
from torch.utils import _pytree as pytree

#: Scalars a call can carry as they are (JSON values): recorded as constants of a block call.
JSON_SCALARS = (type(None), bool, int, float, str)
#: Values pytree keeps as leaves that a call layout records as they are (a tensor input or a constant): a call
#: made only of these has the structure of its argument names, read without a pytree walk.
PLAIN_LEAVES = (torch.Tensor,) + JSON_SCALARS


@functools.lru_cache(maxsize=1024)
def loaded_treespec(dumped: str) -> pytree.TreeSpec:
    """The ``TreeSpec`` that ``pytree.treespec_dumps`` wrote as ``dumped``, loaded once and shared."""
    return pytree.treespec_loads(dumped)


def flatten_output(value):
    """Flatten a block output the way its exported graph does: ``None`` entries count as leaves."""
    return pytree.tree_flatten(value, is_leaf=lambda v: v is None)
