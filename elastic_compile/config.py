"""ElasticConfig: every knob of ``transform`` in one validated dataclass."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from .errors import ConfigError

#: What a skipped block may return besides nothing, by name -> how many past updates of the block it reads: the
#: last update ("reuse") or a polynomial extrapolation of the last two or three ("forecast", "forecast2"); see
#: ``elastic_compile/cache/forecast.py``.
SKIP_ACTIONS = {"reuse": 1, "forecast": 2, "forecast2": 3}


#: A router is a small MLP; a hidden width beyond this is a typo that would allocate gigabytes.
MAX_ROUTER_HIDDEN = 1 << 16


@dataclass(frozen=True)
class ElasticConfig:
    """How a DiT is made elastic.

    Attributes:
        width_buckets: MLP widths (fractions of the hidden width) each FFN can run at. Must be increasing,
            in (0, 1], and end with 1.0 (the dense width).
        threshold: a block runs for a sample iff its router's run-probability is >= threshold (tau).
        allow_skip: let routers skip whole blocks (blocks whose outputs are residual updates only).
        router_hidden: hidden width of each router's MLP; reduced automatically so that a router stays
            within ``router_param_budget`` of its block's parameters (never below ``router_min_hidden``).
        router_param_budget: most router parameters allowed, as a fraction of its block's parameters.
        importance: how FFN hidden units are ordered: "weight" (norms of in/out projections), "activation"
            (needs calibration inputs; mean |activation| x out-projection column norm) or "auto"
            (activation when calibration inputs are given, else weight).
        verify: after rewriting, check every block numerically (dense reproduction and every width bucket
            against the masked dense graph) on the recorded inputs; a block failing the width check keeps
            a skip-only router and the report says why.
        verify_atol: absolute tolerance of those checks (float32).
        skip_actions: what a skipped block may stand in with when the feature cache is on (names of
            :data:`SKIP_ACTIONS`). With more than one, every router also scores them and picks one per sample
            (its first one untrained); skips that no router decides (``force``) take the first.
    """

    width_buckets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    threshold: float = 0.5
    allow_skip: bool = True
    router_hidden: int = 64
    router_min_hidden: int = 8
    router_param_budget: float = 0.01
    importance: str = "auto"
    verify: bool = True
    verify_atol: float = 1e-4
    skip_actions: tuple[str, ...] = ("reuse",)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        _check_types(self)
        buckets = tuple(float(b) for b in self.width_buckets)
        object.__setattr__(self, "width_buckets", buckets)
        if not buckets or any(not 0.0 < b <= 1.0 for b in buckets):
            raise ConfigError("width_buckets in (0, 1]", f"{buckets}", "Give fractions such as (0.25, 0.5, 0.75, 1.0).")
        if list(buckets) != sorted(set(buckets)) or buckets[-1] != 1.0:
            raise ConfigError(
                "strictly increasing width_buckets ending with 1.0", f"{buckets}",
                "Sort the buckets, drop duplicates and include 1.0 (the dense width).",
            )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold in (0, 1)", f"{self.threshold}", "Use e.g. 0.5.")
        if self.importance not in ("auto", "weight", "activation"):
            raise ConfigError("importance in {'auto', 'weight', 'activation'}", repr(self.importance), "Pick one of those.")
        if not 1 <= self.router_min_hidden <= self.router_hidden <= MAX_ROUTER_HIDDEN:
            raise ConfigError(
                f"1 <= router_min_hidden <= router_hidden <= {MAX_ROUTER_HIDDEN}",
                f"{self.router_min_hidden}, {self.router_hidden}",
                "Raise router_hidden or lower router_min_hidden.",
            )
        actions = tuple(str(a) for a in self.skip_actions) if not isinstance(self.skip_actions, str) else ()
        object.__setattr__(self, "skip_actions", actions)
        if not actions or len(set(actions)) != len(actions) or any(a not in SKIP_ACTIONS for a in actions):
            raise ConfigError(f"distinct skip_actions among {sorted(SKIP_ACTIONS)}", f"{self.skip_actions!r}",
                              "Use e.g. ('reuse',) or ('reuse', 'forecast', 'forecast2').")
        if not 0.0 < self.router_param_budget <= 1.0:
            raise ConfigError("router_param_budget in (0, 1]", f"{self.router_param_budget}", "Use e.g. 0.01.")
        if not 0.0 <= self.verify_atol < math.inf:  # NaN would turn every check into a pass
            raise ConfigError("verify_atol: a finite number >= 0", f"{self.verify_atol}", "Use e.g. 1e-4.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ElasticConfig":
        if not isinstance(data, dict):
            raise ConfigError("an ElasticConfig as a dict of fields", type(data).__name__, "Pass a dict.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"ElasticConfig fields {sorted(known)}", f"unknown fields {sorted(unknown)}",
                              "The artifact was written by a newer elastic_compile; upgrade.")
        data = dict(data)
        buckets = data.get("width_buckets", cls.width_buckets)
        data["width_buckets"] = tuple(buckets) if isinstance(buckets, (list, tuple)) else buckets
        actions = data.get("skip_actions", cls.skip_actions)
        data["skip_actions"] = tuple(actions) if isinstance(actions, (list, tuple)) else actions
        return cls(**data)


_TYPES = {"threshold": numbers.Real, "allow_skip": bool, "router_hidden": numbers.Integral,
          "router_min_hidden": numbers.Integral, "router_param_budget": numbers.Real, "importance": str,
          "verify": bool, "verify_atol": numbers.Real, "extra": dict}
_NAMES = {numbers.Real: "number", numbers.Integral: "integer", bool: "bool", str: "string", dict: "dict"}


def _check_types(config: ElasticConfig) -> None:
    """Each field of the type it means: ``allow_skip="no"`` is truthy and ``router_hidden=True`` an int, and
    both would be taken silently otherwise."""
    for name, kind in _TYPES.items():
        value = getattr(config, name)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ConfigError(f"{name} as a {_NAMES[kind]}", f"{value!r}", f"Give {name} a {_NAMES[kind]} value.")
    buckets = config.width_buckets
    if not isinstance(buckets, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, numbers.Real)
                                                     for b in buckets):
        raise ConfigError("width_buckets as a sequence of numbers", f"{buckets!r}", "E.g. (0.25, 0.5, 0.75, 1.0).")
