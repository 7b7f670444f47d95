"""One (context, block) of the feature cache with per-sample state as Python lists (the host gate's entry).

It keeps the block's last ``depth`` updates ``out - in`` per residual output as (B, ...) tensors (oldest first;
each sample's newest update in the last slot), the step each of a sample's updates was stored at, and how many
stand-ins a sample took in a row. Steps count this entry's calls (``tick``: every model call in the context passes
once through the block's gate), so a forecast knows how far ahead of its points it is.
"""
from __future__ import annotations

import torch

from ..batch import per_sample
from .forecast import lagrange_weights
from .rules import HOST, IDENTITY, POINTS


class HostEntry:
    flags = HOST

    def __init__(self, batch: int, depth: int = 1):
        self.batch, self.depth = batch, depth
        self.step = -1
        self.slots: dict[int, list[torch.Tensor | None]] = {}
        self.stamps: list[list[int]] = [[] for _ in range(batch)]
        self.streak = [0] * batch

    def tick(self) -> None:
        """A new call of the block in this context: the step its decisions, stand-ins and updates belong to."""
        self.step += 1

    def usable(self, max_reuse: int, choice: list[int], min_points: int = 1) -> list[bool]:
        """Samples whose stand-in ``choice`` can serve: as many stored updates as it reads, or ``min_points``
        (at least one), and fewer than ``max_reuse`` stand-ins in a row."""
        return [len(s) >= max(1, min(POINTS.get(c, 1), min_points)) and k < max_reuse
                for s, k, c in zip(self.stamps, self.streak, choice)]

    def weights(self, sample: int, code: int) -> list[float]:
        """Slot weights (oldest first) of stand-in ``code`` for ``sample`` at this step; zeros for identity."""
        row = [0.0] * self.depth
        stamps = self.stamps[sample]
        points = min(POINTS.get(code, 0), len(stamps), self.depth)
        if points:
            row[self.depth - points:] = lagrange_weights(stamps[-points:], self.step)
        return row

    def stand_ins(self, stand_in: list[int], like: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """Per residual output, the update each sample's stand-in adds ((B, ...), zero where identity), or None
        when every sample's is identity. Differentiable in the stored updates (rollout training)."""
        taken = [s for s, code in enumerate(stand_in) if code != IDENTITY]
        if not taken:
            return None
        weights = [self.weights(s, code) for s, code in enumerate(stand_in)]
        shared = weights[0] if len(taken) == self.batch and all(w == weights[0] for w in weights) else None
        values = {}
        for leaf, x in like.items():
            slots = self.slots[leaf]
            value = None
            if shared is not None:  # every sample alike (the usual case): scalar weights, no per-row table
                for w, slot in zip(shared, slots):
                    if w:
                        term = slot if w == 1.0 else slot * w
                        value = term if value is None else value + term
            else:
                table = torch.tensor(weights, dtype=x.dtype, device=x.device)
                for k, slot in enumerate(slots):
                    if slot is not None and bool(table[:, k].ne(0).any()):
                        term = per_sample(table[:, k], x) * slot
                        value = term if value is None else value + term
            values[leaf] = torch.zeros_like(x) if value is None else value.to(x.dtype)
        return values

    def skip_values(self, inputs: dict[int, torch.Tensor], stand_in: list[int]) -> dict[int, torch.Tensor]:
        """``in + stand-in`` per sample (``in`` where identity); counts the stand-ins."""
        if all(code == stand_in[0] for code in stand_in) and stand_in[0] != IDENTITY and all(
                s == self.stamps[0] for s in self.stamps):
            # every sample alike (the usual case, between two blocks): one fused multiply-add per point used
            weights = self.weights(0, stand_in[0])
            out = {}
            for leaf, x in inputs.items():
                value = x
                for w, slot in zip(weights, self.slots[leaf]):
                    if w:
                        value = torch.add(value, slot.to(x.dtype), alpha=w)
                out[leaf] = value
            self.count(stand_in)
            return out
        values = self.stand_ins(stand_in, inputs)
        if values is None:
            return dict(inputs)
        self.count(stand_in)
        return {leaf: x + values[leaf] for leaf, x in inputs.items()}

    def count(self, stand_in: list[int]) -> None:
        for s, code in enumerate(stand_in):
            if code != IDENTITY:
                self.streak[s] += 1

    def store(self, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor], ran: list[bool],
              keep_graph: bool = False) -> None:
        """Push ``out - in`` of the samples that ran as their newest update (their stand-in streaks restart).
        ``keep_graph``: keep the autograd graph (rollout training backpropagates through stand-ins)."""
        if not any(ran):
            return
        every = all(ran)
        mask = None
        for leaf, x in inputs.items():
            delta = outputs[leaf] - x
            if not keep_graph:
                delta = delta.detach()
            slots = self.slots.setdefault(leaf, [None] * self.depth)
            if every:  # the usual case: the window slides, nothing is copied
                self.slots[leaf] = slots[1:] + [delta]
                continue
            if mask is None:
                mask = per_sample(torch.tensor(ran, device=x.device), x)
            moved = [_select(mask, slots[k + 1], slots[k], delta) for k in range(self.depth - 1)]
            self.slots[leaf] = moved + [_select(mask, delta, slots[-1], delta)]
        for s, r in enumerate(ran):
            if r:
                self.stamps[s] = (self.stamps[s] + [self.step])[-self.depth:]
                self.streak[s] = 0


def _select(mask: torch.Tensor, new, old, like: torch.Tensor):
    """``where(mask, new, old)`` for slots that may not exist yet (None: never written, read as zeros)."""
    if new is None and old is None:
        return None
    return torch.where(mask, torch.zeros_like(like) if new is None else new,
                       torch.zeros_like(like) if old is None else old)
