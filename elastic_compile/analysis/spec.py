"""What the analysis found, as plain JSON-serialisable dataclasses (saved with every elastic artifact)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamSlice:
    """How one parameter is cut to a width: along ``dim``, unit ``j`` sits at index ``start + j`` for every
    ``start`` in ``unit_starts``; indices in the half-open ``keep`` ranges (foreign channels) are always kept.
    Kept indices are taken in increasing order, which preserves chunk/concat layouts of the graph."""

    param: str
    dim: int
    unit_starts: tuple[int, ...]
    keep: tuple[tuple[int, int], ...] = ()

    def indices(self, units: int) -> list[int]:
        kept = {i for a, b in self.keep for i in range(a, b)}
        kept.update(s + j for s in self.unit_starts for j in range(units))
        return sorted(kept)

    def permutation(self, unit_order, size: int) -> list[int]:
        """Index map applying a unit permutation (new unit j = old unit ``unit_order[j]``) to this parameter."""
        index = list(range(size))
        for s in self.unit_starts:
            for j, old in enumerate(unit_order):
                index[s + j] = s + int(old)
        return index

    @property
    def module(self) -> str:
        return self.param.rsplit(".", 1)[0] if "." in self.param else ""

    @property
    def attribute(self) -> str:
        return self.param.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class FFNSite:
    """One FFN of a block: ``hidden`` units, the parameters that hold them, and the out-projection."""

    name: str
    hidden: int
    in_projections: tuple[ParamSlice, ...]
    out_projection: ParamSlice
    activation: str
    kind: str  # "linear" or "conv" (the out-projection's op)

    def all_slices(self) -> tuple[ParamSlice, ...]:
        return self.in_projections + (self.out_projection,)

    def units_at(self, width: float) -> int:
        return max(1, int(round(width * self.hidden)))


@dataclass(frozen=True)
class RouterFeature:
    """One router input: block argument ``name``, read as ``kind`` ("pooled" tokens, "vector", "scalar")."""

    name: str
    kind: str
    dim: int


@dataclass
class BlockSpec:
    """Everything the rewrite needs to know about one transformer block, in the order blocks run."""

    index: int
    path: str
    class_name: str
    residual_of: dict[int, str]            # output leaf index -> block argument it updates
    output_spec: str                       # pytree TreeSpec (treespec_dumps) of the block's output
    num_output_leaves: int
    features: list[RouterFeature]
    sites: list[FFNSite]
    skippable: bool
    notes: list[str] = field(default_factory=list)
    group: int = 0                          # blocks of one group share one analysis
    rows_split: bool = True                 # one row of the call run alone computes that row (analysis/batching.py)
    batch_axis: bool = True                 # False: no batch axis, one decision per call (nn/call_router.py)

    @property
    def elastic_width(self) -> bool:
        return bool(self.sites)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["residual_of"] = {str(k): v for k, v in self.residual_of.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BlockSpec":
        data = dict(data)
        data["residual_of"] = {int(k): v for k, v in data["residual_of"].items()}
        data["features"] = [RouterFeature(**f) for f in data["features"]]
        data["sites"] = [_site_from_dict(s) for s in data["sites"]]
        return cls(**data)


def _slice_from_dict(d: dict) -> ParamSlice:
    return ParamSlice(d["param"], d["dim"], tuple(d["unit_starts"]), tuple(tuple(r) for r in d["keep"]))


def _site_from_dict(d: dict) -> FFNSite:
    return FFNSite(d["name"], d["hidden"], tuple(_slice_from_dict(s) for s in d["in_projections"]),
                   _slice_from_dict(d["out_projection"]), d["activation"], d["kind"])
