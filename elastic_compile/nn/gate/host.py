"""Host routing, the gate's mode at inference: decisions on the host, samples that share a plan run together.

Each block copies its router's logits to the host once (one synchronisation per block on an accelerator; see
:mod:`.device` for the alternative), decides per sample there (:mod:`.decisions`), applies the feature cache's
rules (``elastic_compile/cache/rules.py``) to Python lists, records the decisions for ``stats`` and runs the
plan: the whole batch at once when every sample agrees, the skip output when none runs, else one sub-batch per
width bucket (``BlockGate.execute``). A block whose inputs cannot be cut by rows (``spec.rows_split`` false: text
flattened across the batch) never runs sub-batches: when its samples disagree, every sample runs at the widest
width any running sample chose, and that is what is recorded. Guarantee: each sample's output is what the block
computes for it alone under its recorded decisions.

This is the path every block takes between two others, where each Python step runs with cold caches, so when the
router decides everything (no ``force``, a block that may skip and narrow) it takes no detour through the
batch-size scan and the static decisions.
"""
from __future__ import annotations

from ...cache.rules import IDENTITY
from ...state import BlockCall
from .decisions import host_actions, host_decisions


def forward(gate, args: tuple, kwargs: dict):
    state = gate.state
    arguments = gate.bind(args, kwargs)
    actions = None
    if gate.routes_everything():
        run, bucket, p_run, actions = routed_decisions(gate.router, arguments, state.config.threshold)
        batch, router_ran = len(run), True
    else:
        batch = gate.stream_batch(arguments)
        run, bucket, router_ran, p_run, actions = gate.decide(arguments, batch)
    cache = state.cache
    if cache is None or not gate.spec.skippable:
        stand_in, reused = None, [False] * batch
    else:
        entry = cache.entry(gate.index, batch)
        entry.tick()
        run, stand_in = cache.plan(entry, run, p_run, state.config.threshold, actions)
        reused = [code != IDENTITY for code in stand_in]
    if not gate.spec.rows_split and (len(set(run)) > 1 or len(set(b for r, b in zip(run, bucket) if r)) > 1):
        run, bucket, stand_in, reused = whole_batch_plan(run, bucket, stand_in, reused)
    state.record(BlockCall(gate.index, run, bucket, router_ran, reused))
    return gate.execute(run, bucket, stand_in, args, kwargs, arguments, batch)


def routed_decisions(router, arguments: dict, threshold: float):
    """``(run, bucket, p_run, actions)`` per sample from the router (``actions`` None without an action head);
    served from the router's decision memo where it has one (it reads the timestep only) and has decided for
    these values before (:mod:`elastic_compile.nn.decision_memo`)."""
    memo_of = getattr(router, "decision_memo", None)  # routers stood in for (ONNX graphs, recorders) have none
    memo = None if memo_of is None else memo_of()
    key = None if memo is None else memo.key(arguments, threshold)
    decided = None if key is None else memo.get(key)
    if decided is None:
        rows = router.logits(arguments).tolist()
        run, bucket, p_run = host_decisions(rows, threshold, True, True, router.num_widths)
        actions = host_actions(rows, router.num_widths) if router.num_actions else None
        decided = (tuple(run), tuple(bucket), tuple(p_run), None if actions is None else tuple(actions))
        if key is not None:
            memo.put(key, decided)
    run, bucket, p_run, actions = decided
    return list(run), list(bucket), list(p_run), None if actions is None else list(actions)


def whole_batch_plan(run: list[bool], bucket: list[int], stand_in, reused):
    """One plan for the whole batch from disagreeing per-sample ones: run every sample (at the widest bucket a
    running sample chose) when any runs; no sample reuses the cache then."""
    widest = max(b for r, b in zip(run, bucket) if r)
    batch = len(run)
    return [True] * batch, [widest] * batch, (None if stand_in is None else [IDENTITY] * batch), [False] * batch
