"""One (context, block) of the feature cache as device tensors updated in place (device routing's entry).

The state of :class:`~.host_entry.HostEntry` without a host copy: updates ``(depth, B, ...)`` per residual output,
stamps ``(B, depth)``, the number of valid points and the stand-in streak per sample, and the entry's step as a
device scalar. Everything is updated in place, so a captured CUDA graph keeps reading and writing the same memory
across replays, and ``reset`` reaches it.
"""
from __future__ import annotations

import torch

from ..batch import per_sample
from .forecast import lagrange_weight_rows
from .rules import DEVICE, IDENTITY, POINTS


class DeviceEntry:
    flags = DEVICE

    def __init__(self, inputs: dict[int, torch.Tensor], batch: int, depth: int = 1):
        device = next(iter(inputs.values())).device
        self.batch, self.depth = batch, depth
        self.step = torch.full((), -1.0, device=device)
        self.stamps = torch.zeros(batch, depth, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.streak = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = {leaf: torch.zeros((depth,) + tuple(x.shape), dtype=x.dtype, device=device)
                      for leaf, x in inputs.items()}
        # per stand-in code, a (codes,) table of point counts: the device gathers each sample's by its code
        self.points = torch.tensor([0] + [POINTS[c] for c in sorted(POINTS)], device=device)

    def reset(self) -> None:
        self.step.fill_(-1.0)
        self.count.zero_()
        self.streak.zero_()

    def tick(self) -> None:
        self.step.add_(1.0)

    def usable(self, max_reuse: int, choice: torch.Tensor, min_points: int = 1) -> torch.Tensor:
        """Rows whose stand-in ``choice`` can serve (:meth:`HostEntry.usable`'s rule, as tensors)."""
        needed = self.points.index_select(0, choice).clamp(min=1, max=min_points)
        return (self.count >= needed) & (self.streak < max_reuse)

    def skip_values(self, inputs: dict[int, torch.Tensor], stand_in: torch.Tensor) -> dict[int, torch.Tensor]:
        """New tensors: ``in + stand-in`` per row (``in`` where identity)."""
        points = torch.minimum(self.points.index_select(0, stand_in), self.count)
        weights = lagrange_weight_rows(self.stamps, points, self.step)          # (B, depth), zero where identity
        out = {}
        for leaf, x in inputs.items():
            slots = self.slots[leaf]
            value = x
            for k in range(self.depth):
                value = value + per_sample(weights[:, k].to(x.dtype), x) * slots[k]
            out[leaf] = value
        return out

    def store(self, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor], ran: torch.Tensor,
              stand_in: torch.Tensor) -> None:
        """In place: rows that ran push ``out - in`` as their newest update (streaks restart); rows that took a
        stand-in count it."""
        for leaf, slots in self.slots.items():
            x = inputs[leaf]
            mask = per_sample(ran, x)
            for k in range(self.depth - 1):
                slots[k].copy_(torch.where(mask, slots[k + 1], slots[k]))
            slots[-1].copy_(torch.where(mask, outputs[leaf] - x, slots[-1]))
        shifted = torch.cat([self.stamps[:, 1:], self.step.expand(self.batch, 1)], dim=1)
        self.stamps.copy_(torch.where(ran[:, None], shifted, self.stamps))
        self.count.copy_(torch.where(ran, (self.count + 1).clamp(max=self.depth), self.count))
        self.streak.copy_(torch.where(ran, 0, self.streak + (stand_in != IDENTITY).long()))
