"""Router logits that a block graph computed for the next block (see :mod:`elastic_compile.export.lookahead`).

The executor of block ``i`` (or the model driver, for a graph of the ops outside the blocks right before block
``j``: see :mod:`elastic_compile.export.outside`) remembers the logits its graph returned for router ``j``
together with the tensors those logits were computed from (block ``i``'s outputs and inputs that router ``j`` reads). Router ``j``'s
:class:`~.host_router.HostRouter` takes them only when (1) it is given those very tensors, unmodified (identity
and version counter, as :class:`~elastic_compile.nn.memo.TensorMemo`): glue code between the blocks, a skipped
or regrouped batch, or a cache-reuse output all give other tensors and a miss; and (2) the PyTorch router still
holds the weights the graph was exported with (:class:`ExportedWeights`). On a miss the router computes its
logits itself, so a hit never changes a decision beyond float32 rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.memo import StampedEntries, is_stamped, stamp


class LookaheadLogits(StampedEntries):
    """Per router (block index): the last logits a block graph computed for it, with their source tensors."""

    def __init__(self):
        super().__init__(dict)  # per thread, block -> (source stamps, logits)

    def remember(self, block: int, sources: Sequence[torch.Tensor], logits: torch.Tensor) -> None:
        self._entries[block] = ([stamp(t) for t in sources], logits)

    def lookup(self, block: int, values: Sequence) -> torch.Tensor | None:
        """The logits for ``block`` if they were computed from exactly ``values`` (same objects, unmodified)."""
        entry = self._entries.get(block)
        if entry is not None and len(entry[0]) == len(values):
            for source, value in zip(entry[0], values):
                if not is_stamped(value, source):
                    break
            else:
                return self._served(entry[1])
        return self._served(None)


class ExportedWeights:
    """Whether a PyTorch router still holds the weights it had when the runtime was loaded (= the exported
    ones: the runtime loads the routers saved with the graphs). Re-checked only after a parameter changed
    (``Router.folded`` is rebuilt then), by value, so weights put back after a change count as exported."""

    def __init__(self, router: nn.Module):
        self.router = router
        self.exported = {name: p.detach().clone() for name, p in router.named_parameters()}
        self._checked = router.folded()
        self._current = True

    def current(self) -> bool:
        folded = self.router.folded()
        if folded is not self._checked:
            named = dict(self.router.named_parameters())
            self._current = named.keys() == self.exported.keys() and all(
                named[name].dtype == value.dtype and named[name].shape == value.shape
                and torch.equal(named[name].detach().cpu(), value.cpu()) for name, value in self.exported.items())
            self._checked = folded
        return self._current
