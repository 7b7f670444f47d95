"""Search a per-step, per-block forecast schedule on the reference model, then train routers that serve it.

    python benchmarks/search_schedule.py [--anchors 1,2,3 --above 0.6 --out results/routers]

Per-sample routing barely pays on the reference model (``quality.md``: the routers' decisions averaged per step
serve as well as the routers), so what routers can learn there is *where* in the trajectory each block may stand
in. This searches that directly, data-free, on the served objective: a table ``run[step][block]``; a block that
does not run stands in with a second-order forecast of its update (``forecast2``, from >= 2 stored updates, else
it runs). The score of a table is the log MSE of whole generations against dense images from the same noise
(calibration labels and seed differ from ``quality.py``'s evaluation).

1. start from the router-free block forecast at K = 1, 2, 3 (at K=1 every block runs steps 0, 1, 3, 5, ...);
2. sensitivity: the score change of flipping each cell alone (run -> forecast, forecast -> run);
3. swaps at equal FLOPs, one per round: a best-gaining forecast runs instead of a cheapest run (the best pair
   of the top three of each); ``--swap-rounds`` rounds, or more rounds later with ``--continue-from``;
   (dropping the cheapest runs alone to reach fewer FLOPs does not work: runs that are cheap to drop one at a
   time are costly together, e.g. neighbours in one block, so each FLOP level starts from its own K);
4. more FLOPs than K=1: the best-gaining forecasts run too, kept only if that scores better (it need not: a run
   between two stand-ins changes the points a second-order forecast extrapolates from);
5. ``--actions``: per kept table, the skip action of each step (reuse, first- or second-order forecast), greedy
   over steps (``action_search``), kept only if it also scores better on held-out noise (``--validate-seed``);
6. per table, routers that serve it (``fit_schedule_routers``: the run logit and the action learned from the
   timestep alone), saved as ``schedule_budget_<fraction>`` router sets with the cache they need.

Writes ``<out>/schedule_budget_*`` and ``schedule_search.json`` (tables and scores per round) next to them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
from elastic_compile.cli.common import synthesize_dit_inputs
from elastic_compile.reference import ASSETS_DIR, load_reference
from elastic_compile.sampling import sample
from schedule_ablation import StepCounter  # benchmarks/schedule_ablation.py

RESULTS = Path(__file__).resolve().parent / "results"
ACTION = "forecast2"
FIRST_FREE_STEP = 2  # a forecast needs two stored updates: every block runs steps 0 and 1


#: The skip actions a searched table may choose per step (``--actions``); ACTION where it chooses none.
ACTIONS = ("reuse", "forecast", "forecast2")


class TableDenoiser:
    """The elastic model under ``table``: at step s block b runs iff ``table[s][b]``, else it stands in with
    ``actions[s][b]`` (None, or no action table: ACTION)."""

    def __init__(self, model, counter: StepCounter, table, actions=None):
        self.model, self.counter, self.table, self.actions = model, counter, table, actions

    def __call__(self, *args, **kwargs):
        step = self.counter.step
        skip = frozenset(b for b, runs in enumerate(self.table[step]) if not runs)
        chosen = {b: (self.actions[step][b] if self.actions else None) or ACTION for b in skip}
        with ec.force(self.model, skip=skip, width=1.0, action=chosen):
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def block_forecast_table(steps: int, blocks: int, max_reuse: int = 1) -> list[list[bool]]:
    """The router-free block forecast's schedule: every block runs steps 0 and 1, then stands in ``max_reuse``
    steps in a row and runs once, over and over."""
    return [[s < FIRST_FREE_STEP or (s - 1) % (max_reuse + 1) == 0 for _ in range(blocks)] for s in range(steps)]


def per_block_table(steps: int, reuse: list[int]) -> list[list[bool]]:
    """Each block b on the block forecast's schedule at its own K = ``reuse[b]``."""
    columns = [block_forecast_table(steps, 1, k) for k in reuse]
    return [[columns[b][s][0] for b in range(len(reuse))] for s in range(steps)]


def per_block_greedy(score, steps: int, blocks: int, top_k: int, note) -> list[tuple[list[list[bool]], float]]:
    """From every block at K=1, raise one block's K per round (the block whose raise costs least), up to
    ``top_k`` for all: one table per round, from 0.52 of the cells down to K=``top_k`` everywhere."""
    reuse = [1] * blocks
    table = per_block_table(steps, reuse)
    found = [(table, score(table))]
    while min(reuse) < top_k:
        trials = []
        for b in (b for b in range(blocks) if reuse[b] < top_k):
            candidate = reuse[:b] + [reuse[b] + 1] + reuse[b + 1:]
            trials.append((score(per_block_table(steps, candidate)), candidate))
        value, reuse = min(trials)
        found.append((per_block_table(steps, reuse), value))
        note(phase="per-block K", reuse=reuse, score=value, fraction=fraction(found[-1][0]))
    return found


def step_greedy(score, steps: int, blocks: int, note, floor: float = 0.2) -> list[tuple[list[list[bool]], float]]:
    """Whole steps at a time: from every block running every step, drop per round the step whose stand-in
    (every block forecasts) costs least, re-scored each round, down to ``floor`` of the cells. Blocks that stand
    in at the same steps keep each other's inputs and histories consistent; mixing phases across blocks
    (per-block K) scores worse than either uniform K it lies between."""
    running = set(range(steps))
    table = lambda rows: [[s in rows] * blocks for s in range(steps)]  # noqa: E731
    found = []
    while len(running) / steps > floor:
        trials = [(score(table(running - {s})), s) for s in sorted(running) if s >= FIRST_FREE_STEP]
        value, step = min(trials)
        running = running - {step}
        found.append((table(running), value))
        note(phase="step greedy", steps=sorted(running), score=value, fraction=fraction(found[-1][0]))
    return found


def step_table(steps: int, blocks: int, running) -> list[list[bool]]:
    return [[s in running] * blocks for s in range(steps)]


def step_local_search(score, steps: int, blocks: int, reuse: int, count: int, rounds: int, note):
    """Whole-step schedule with ``count`` run steps: the block forecast's at K=``reuse``, cut to ``count`` by
    dropping the step that costs least (re-scored each time), then hill-climbing on moves of one run step to a
    neighbouring step (every move re-scored; the best taken while it scores better)."""
    running = {s for s in range(steps) if block_forecast_table(steps, 1, reuse)[s][0]}
    while len(running) > count:
        value, drop = min((score(step_table(steps, blocks, running - {s})), s) for s in running if s >= FIRST_FREE_STEP)
        running = running - {drop}
    value = score(step_table(steps, blocks, running))
    note(phase=f"steps K={reuse} x{count} start", steps=sorted(running), score=value)
    for _ in range(rounds):
        moves = {frozenset(running - {s} | {s + d}) for s in running if s >= FIRST_FREE_STEP for d in (-1, 1)
                 if FIRST_FREE_STEP <= s + d < steps and s + d not in running}
        best = min((score(step_table(steps, blocks, m)), sorted(m)) for m in moves)
        if best[0] >= value:
            break
        value, running = best[0], set(best[1])
        note(phase=f"steps K={reuse} x{count} moved", steps=sorted(running), score=value)
    return step_table(steps, blocks, running), value


def fraction(table) -> float:
    return sum(map(sum, table)) / (len(table) * len(table[0]))


def flipped(table, cells, value=None):
    out = [list(row) for row in table]
    for s, b in cells:
        out[s][b] = (not out[s][b]) if value is None else value
    return out


class Scorer:
    def __init__(self, assets, labels, seed):
        model, self.scheduler, self.config = load_reference(assets)
        self.labels, self.seed = labels, seed
        with torch.no_grad():
            self.dense = sample(model, self.scheduler, labels, self.config, seed=seed)
        self.model = ec.transform(model, ec.ElasticConfig(width_buckets=(1.0,), skip_actions=ACTIONS),
                                  example_inputs=synthesize_dit_inputs(model))
        self.steps, self.blocks = self.config.num_inference_steps, len(ec.state.state_of(self.model).blocks)
        apply_feature_cache(self.model, FeatureCacheConfig(max_reuse=self.steps, fallback="run"))
        self.counter = StepCounter(ElasticCacheHooks(self.model))
        self.calls = 0

    def __call__(self, table, actions=None) -> float:
        self.calls += 1
        with torch.no_grad():
            images = sample(TableDenoiser(self.model, self.counter, table, actions), self.scheduler, self.labels,
                            self.config, seed=self.seed, hooks=self.counter)
        return math.log((images - self.dense).pow(2).mean().item() + 1e-12)


def free_cells(table, runs: bool):
    return [(s, b) for s in range(FIRST_FREE_STEP, len(table)) for b in range(len(table[0])) if table[s][b] == runs]


def sensitivities(score, table, base, runs: bool) -> dict:
    """Score change of flipping each free cell that currently ``runs`` (or not) alone."""
    return {cell: score(flipped(table, [cell])) - base for cell in free_cells(table, runs)}


def refine_swaps(score, table, base, log, top: int = 3):
    """One swap at equal FLOPs: a forecast that gains most runs instead of a run that costs least, the best pair
    among the ``top`` of each (by single-flip sensitivity) kept when it scores better. Sensitivities do not add
    up (several swaps at once score far worse than one), hence one swap per round."""
    removal = sensitivities(score, table, base, runs=True)
    adding = sensitivities(score, table, base, runs=False)
    cheap = sorted(removal, key=removal.get)[:top]
    gain = sorted(adding, key=adding.get)[:top]
    best = (base, table)
    for remove in cheap:
        for add in gain:
            candidate = flipped(table, [remove, add])
            value = score(candidate)
            log.append(dict(phase="swap", remove=remove, add=add, score=value, fraction=fraction(candidate)))
            if value < best[0]:
                best = (value, candidate)
    return best[1], best[0], adding


def action_search(score, table, value: float, note, rounds: int = 2):
    """Per step, the skip action every block standing in at that step takes (greedy: each step's alternatives
    tried in turn, a change kept when it scores better, ``rounds`` passes). Whole steps, as for run steps:
    blocks standing in together keep each other's inputs consistent. Returns ``(actions, score)``, ``actions``
    a table of names (None where the block runs)."""
    steps = [s for s, row in enumerate(table) if not all(row)]
    chosen = {s: ACTION for s in steps}

    def as_table(per_step):
        return [[None if runs else per_step.get(s, ACTION) for runs in row] for s, row in enumerate(table)]

    for _ in range(rounds):
        changed = False
        for step in steps:
            for name in ACTIONS:
                if name == chosen[step]:
                    continue
                trial = {**chosen, step: name}
                trial_value = score(table, as_table(trial))
                if trial_value < value:
                    chosen, value, changed = trial, trial_value, True
                    note(phase="action", step=step, action=name, score=value)
        if not changed:
            break
    return as_table(chosen), value


def encode_actions(actions) -> list[str]:
    """An action table as strings, one per step: '-' where the block runs, else the action's index in ACTIONS."""
    return ["".join("-" if name is None else str(ACTIONS.index(name)) for name in row) for row in actions]


def decode_actions(rows: list[str]):
    return [[None if c == "-" else ACTIONS[int(c)] for c in row] for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default="1,2,3", help="block forecast K values the search starts from")
    parser.add_argument("--above", default="0.6", help="fractions above the K=1 anchor (best-gaining runs added)")
    parser.add_argument("--swap-rounds", type=int, default=1)
    parser.add_argument("--per-block", type=int, default=0, metavar="K",
                        help="instead of the anchors: per-block K from all 1 up to all K (one block raised per "
                        "round, the cheapest), then swap rounds on the tables nearest --keep fractions")
    parser.add_argument("--per-step", action="store_true",
                        help="instead of the anchors: drop whole steps greedily (every block stands in), then swap "
                        "rounds on the tables nearest --keep fractions")
    parser.add_argument("--step-local", default="", metavar="K:COUNT,...",
                        help="instead of the anchors: whole-step schedules of COUNT run steps from the block "
                        "forecast at K, hill-climbed (run steps moved one step at a time)")
    parser.add_argument("--rounds", type=int, default=6, help="hill-climbing rounds of --step-local")
    parser.add_argument("--per-class", type=int, default=1, help="calibration images per class")
    parser.add_argument("--keep", default="0.48,0.44,0.40", help="with --per-block / --per-step: fractions to keep "
                        "tables at")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=900)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--out", default=str(RESULTS / "routers"))
    parser.add_argument("--tables", help="a previous run's schedule_search.json: only fit and save its kept tables")
    parser.add_argument("--continue-from", help="a previous run's schedule_search.json: more swap rounds on its kept "
                        "tables instead of starting from the anchors")
    parser.add_argument("--actions", action="store_true",
                        help="then search, per kept table, the skip action of each step (reuse, first- or "
                        "second-order forecast; action_search); with --tables: on that file's kept tables (a "
                        "kept table that has actions already keeps them and is only validated)")
    parser.add_argument("--validate-seed", type=int, default=77,
                        help="with --actions: a table keeps its actions only if they also score better on "
                        "generations from this noise (held out from the search's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.tables:
        search(args, out)
    results = Path(args.tables) if args.tables else out / "schedule_search.json"
    if args.actions:
        results = search_actions(args, results, out)
    for entry in json.loads(results.read_text())["log"]:
        if entry["phase"] == "kept":
            table = [[c == "1" for c in row] for row in entry["table"]]
            actions = decode_actions(entry["actions"]) if "actions" in entry else None
            save_schedule_routers(args.assets, table, out / f"schedule_budget_{entry['fraction']:.2f}", actions)
    return 0


def search_actions(args, results: Path, out: Path) -> Path:
    """Per kept table of ``results``, the per-step action search; writes ``schedule_search.json`` in ``out``
    with the kept tables and their action tables (and returns its path)."""
    started = time.time()
    score = Scorer(args.assets, [c for c in range(10) for _ in range(args.per_class)], args.seed)
    log = []

    def note(**entry):
        log.append(dict(entry, calls=score.calls, minutes=round((time.time() - started) / 60, 1)))
        print(json.dumps(log[-1]), flush=True)

    held_out = Scorer(args.assets, score.labels, args.validate_seed)
    for entry in json.loads(results.read_text())["log"]:
        if entry["phase"] != "kept":
            continue
        table = [[c == "1" for c in row] for row in entry["table"]]
        if "actions" in entry:
            actions, value = decode_actions(entry["actions"]), entry["score"]
        else:
            value = score(table)
            note(phase="actions start", score=value, fraction=fraction(table))
            actions, value = action_search(score, table, value, note)
        # per-step choices can fit the search's noise: they are kept only where they also win on held-out noise
        without, with_actions = held_out(table), held_out(table, actions)
        note(phase="validated", fraction=fraction(table), held_out_without=without, held_out_with=with_actions)
        kept = dict(phase="kept", score=value, fraction=fraction(table), table=entry["table"])
        note(**kept, **(dict(actions=encode_actions(actions)) if with_actions < without else {}))
    path = out / "schedule_search.json"
    path.write_text(json.dumps(dict(args=vars(args), source=str(results), log=log), indent=1))
    return path


def search(args, out: Path) -> None:
    started = time.time()
    score = Scorer(args.assets, [c for c in range(10) for _ in range(args.per_class)], args.seed)
    log, kept = [], []

    def note(**entry):
        log.append(dict(entry, calls=score.calls, minutes=round((time.time() - started) / 60, 1)))
        print(json.dumps(log[-1]), flush=True)

    if args.step_local:
        for item in args.step_local.split(","):
            reuse, count = (int(v) for v in item.split(":"))
            kept.append(step_local_search(score, score.steps, score.blocks, reuse, count, args.rounds, note))
        starts = []
    elif args.per_block or args.per_step:
        found = (per_block_greedy(score, score.steps, score.blocks, args.per_block, note) if args.per_block
                 else step_greedy(score, score.steps, score.blocks, note))
        starts = []
        for target in (float(f) for f in args.keep.split(",")):
            table, _ = min(found, key=lambda tv: abs(fraction(tv[0]) - target))
            starts.append((f"per-block {fraction(table):.2f}", table))
    elif args.continue_from:
        starts = [(f"continued {e['fraction']:.2f}", [[c == "1" for c in row] for row in e["table"]])
                  for e in json.loads(Path(args.continue_from).read_text())["log"] if e["phase"] == "kept"]
    else:
        starts = [(f"K={k}", block_forecast_table(score.steps, score.blocks, int(k))) for k in args.anchors.split(",")]
    for name, table in starts:
        anchor = 1 if name == "K=1" else None
        value = score(table)
        note(phase=f"start {name}", score=value, fraction=fraction(table))
        adding = {}
        for _ in range(args.swap_rounds):
            table, value, adding = refine_swaps(score, table, value, log)
            note(phase=f"{name} swapped", score=value, fraction=fraction(table))
        kept.append((table, value))
        if anchor == 1 and adding:
            for target in (float(f) for f in args.above.split(",") if f):
                gain = sorted((c for c in adding if not table[c[0]][c[1]]), key=adding.get)
                count = round((target - fraction(table)) * score.steps * score.blocks)
                more = flipped(table, gain[:count], True)
                more_value = score(more)
                note(phase="added", score=more_value, fraction=fraction(more))
                if more_value < value:  # sensitivities do not add up: more runs can forecast worse
                    kept.append((more, more_value))
    for table, value in kept:
        note(phase="kept", score=value, fraction=fraction(table),
             table=["".join("1" if r else "0" for r in row) for row in table])
    (out / "schedule_search.json").write_text(json.dumps(dict(args=vars(args), log=log), indent=1))


def save_schedule_routers(assets, table, path: Path, actions=None) -> None:
    model, _, _ = load_reference(assets)
    model = ec.transform(model, ec.ElasticConfig(width_buckets=(1.0,), skip_actions=ACTIONS),
                         example_inputs=synthesize_dit_inputs(model))
    from elastic_compile.train import fit_schedule_routers
    _, scheduler, config = load_reference(assets)
    fit_schedule_routers(model, table, lambda: sample(model, scheduler, [0, 1, 2, 3], config, seed=0),
                         action=actions or ACTION)
    ec.save(model, path)


if __name__ == "__main__":
    sys.exit(main())
