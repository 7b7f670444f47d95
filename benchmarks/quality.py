"""Speed-fidelity frontier on the reference model: E-DiT vs training-free caches and static baselines.

    python benchmarks/quality.py            # writes results/quality.md, results/frontier.png, results/grid_*.png

Every method runs in the same harness: the project's sampler (default steps and guidance, CFG as one batch),
the same evaluation labels and noise. Executed FLOP fraction = FLOPs of a whole generation counted with
analysis.flop_counter (matmuls, convolutions, attention) / dense FLOPs (so caches and E-DiT are counted alike);
speedup = dense / method wall-clock, medians of interleaved runs in this process; fidelity = PSNR/SSIM vs the
dense images from the same noise; realism = class accuracy and classifier-feature FID vs held-out digits.

Methods: diffusers FirstBlockCache, TaylorSeer and MagCache (calibrated on this model) through diffusers' hook
API; static block skipping (the same blocks every step, set chosen greedily on a calibration set); static width
pruning (every FFN at one bucket); this toolkit's block cache with no routers (every block reuses its last update
up to K steps in a row, then runs) and its block forecast (first- or second-order extrapolation instead of
reuse); the toolkit's elastic modes: forecast routers trained through rollouts (routers/forecast_budget_*), as
trained and with their decisions averaged per step (the per-sample ablation), routers serving a schedule searched
per step and block on the served objective (routers/schedule_budget_*, search_schedule.py), the same routers trained with the
per-step objective only (routers/forecast_step_budget_*), and one setting of each earlier router family.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

import elastic_compile as ec
from elastic_compile.cli.common import synthesize_dit_inputs
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference, make_grid_png
from elastic_compile.reference.data import load_digits_split
from elastic_compile.analysis.flop_counter import flop_counter
from elastic_compile.reference.evaluate import score
from elastic_compile.reference.metrics import classifier_features, psnr
from frontier import (as_cheap, best_dominating, equal_cost_candidates, paired_fid_difference,  # benchmarks/
                      row_key)
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
from elastic_compile.sampling.hooks import DiffusersCacheHooks
from elastic_compile.sampling import sample
from elastic_compile.state import state_of
from timing import paired_overhead  # benchmarks/timing.py

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS  # where this run writes (--out); router sets are read from RESULTS/routers
#: The toolkit's best elastic mode: routers choosing run / skip and a skip action (reuse, first- or second-order
#: forecast) per block, step and sample, trained through rollouts with the feature cache in the loop.
ELASTIC = "E-DiT forecast routers"
#: Routers that serve a schedule searched per step and block on the served objective (search_schedule.py): what
#: routers can learn where per-sample routing does not pay.
SCHEDULE = "E-DiT schedule routers"
#: Elastic configurations that may dominate a peer: the routers as trained, and their decisions averaged per step
#: over samples (one learned schedule for every sample; the per-sample ablation of the issue's premise).
CANDIDATES = (ELASTIC, ELASTIC + " (per-step schedule)", SCHEDULE)
#: This toolkit's training-free modes (the feature cache with every block asking to skip): elastic configurations
#: that may dominate the other tools' settings, and peers the routers must dominate themselves.
ROUTER_FREE = ("block cache (no routers)", "block forecast (no routers)", "block forecast 2nd order (no routers)")
#: Training-free methods the elastic mode must dominate (quality.md's dominance table).
PEERS = ("FirstBlockCache", "TaylorSeer", "MagCache", "static skip", "static width", "block cache (no routers)",
         "block forecast (no routers)", "block forecast 2nd order (no routers)")


#: Measured speedups over which the elastic mode must dominate every peer (issue 23's goal).
GOAL_RANGE = (1.3, 3.0)


def budget_of(path: Path) -> float:
    return float(path.name.rsplit("_", 1)[1])


class Forced:
    """A denoiser that runs an elastic model under a fixed ``force`` plan (static baselines)."""

    def __init__(self, model, skip=None, width=None):
        self.model, self.skip, self.width = model, skip, width

    def __call__(self, *args, **kwargs):
        with ec.force(self.model, skip=self.skip, width=self.width):
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


@dataclass
class Setting:
    method: str
    label: str
    build: callable  # () -> (denoiser, hooks)


def elastic_base(assets, config: ec.ElasticConfig | None = None):
    model, _, _ = load_reference(assets)
    return ec.transform(model, config, example_inputs=synthesize_dit_inputs(model))


def diffusers_cache(assets, kind: str, **options):
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_mag_cache, apply_taylorseer_cache)
    model, _, _ = load_reference(assets)
    if kind == "fbc":
        apply_first_block_cache(model, FirstBlockCacheConfig(**options))
    elif kind == "taylorseer":
        # diffusers' default TaylorSeer patterns (fullmatch of "^transformer_blocks.*attn") match no module of
        # DiTTransformer2DModel (its attention is "attn1"): name this model's attention and FFN modules explicitly.
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            taylor_factors_dtype=torch.float32, cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"], **options))
    else:
        apply_mag_cache(model, MagCacheConfig(**options))
    return model, DiffusersCacheHooks(model)


def calibrate_mag_ratios(assets, scheduler, config, labels) -> list[float]:
    """Run MagCache's calibration mode on this model and read the ratios it reports."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    model, _, _ = load_reference(assets)
    apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=config.num_inference_steps))
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        sample(model, scheduler, labels, config, seed=500, hooks=DiffusersCacheHooks(model))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    found = [m for m in records if "Calibration Results" in m]
    return [float(x) for x in re.findall(r"[-+0-9.eE]+", found[-1].split(":", 1)[1])]


def greedy_skip_order(assets, scheduler, config, labels, dense_images, blocks_needed: int) -> list[int]:
    """Blocks in the order a greedy search skips them (each time the one that keeps PSNR vs dense highest)."""
    model = elastic_base(assets)
    chosen: list[int] = []
    candidates = [s.index for s in state_of(model).specs if s.skippable]
    while len(chosen) < blocks_needed and candidates:
        best = max(candidates, key=lambda b: psnr(
            sample(Forced(model, skip=set(chosen) | {b}, width=1.0), scheduler, labels, config, seed=900),
            dense_images).mean)
        chosen.append(best)
        candidates.remove(best)
        print(f"  greedy skip order so far: {chosen}", flush=True)
    return chosen


def settings(args, scheduler, config, calibration_labels) -> Iterator[Setting]:
    assets = args.assets
    wanted = {m.strip() for m in args.only.split(",") if m.strip()}
    mag_ratios = order = None
    if not wanted or "MagCache" in wanted:
        mag_ratios = calibrate_mag_ratios(assets, scheduler, config, calibration_labels)
    if not wanted or "static skip" in wanted:
        dense_calibration = sample(load_reference(assets)[0], scheduler, calibration_labels, config, seed=900)
        order = greedy_skip_order(assets, scheduler, config, calibration_labels, dense_calibration,
                                  args.max_static_skip)
    steps = config.num_inference_steps
    out = []
    for t in (0.05, 0.1, 0.2, 0.35):
        out.append(Setting("FirstBlockCache", f"threshold {t}", lambda t=t: diffusers_cache(assets, "fbc", threshold=t)))
    for interval in (2, 3, 4, 6):
        out.append(Setting("TaylorSeer", f"interval {interval}", lambda i=interval: diffusers_cache(
            assets, "taylorseer", cache_interval=i, disable_cache_before_step=2, max_order=1)))
    for t in (0.03, 0.06, 0.12, 0.25):
        out.append(Setting("MagCache", f"threshold {t}", lambda t=t: diffusers_cache(
            assets, "mag", threshold=t, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=steps,
            mag_ratios=mag_ratios)))
    for count in range(2, args.max_static_skip + 1, 2) if order is not None else ():
        skip = set(order[:count])
        out.append(Setting("static skip", f"{count} blocks {sorted(skip)}",
                           lambda s=skip: (Forced(elastic_base(assets), skip=s, width=1.0), None)))
    for width in (0.75, 0.5, 0.25):
        out.append(Setting("static width", f"width {width}",
                           lambda w=width: (Forced(elastic_base(assets), skip=False, width=w), None)))
    for reuse in (1, 2, 3):
        out.append(Setting("block cache (no routers)", f"K={reuse}", lambda k=reuse: block_cache(assets, k)))
    for reuse in (1, 2, 3, 4):
        out.append(Setting("block forecast (no routers)", f"K={reuse}",
                           lambda k=reuse: block_cache(assets, k, action="forecast")))
    for reuse in (1, 2):
        out.append(Setting("block forecast 2nd order (no routers)", f"K={reuse}",
                           lambda k=reuse: block_cache(assets, k, action="forecast2")))
    yield from out
    # Router sets are looked up only now, after the training-free rows: a set saved while those ran is included.
    routers_root = Path(args.routers)
    for path in sorted(routers_root.glob("forecast_budget_*"), key=budget_of):
        yield Setting(ELASTIC, f"budget {budget_of(path)}", lambda p=path: trained(assets, p, "serving"))
        yield Setting(ELASTIC + " (per-step schedule)", f"budget {budget_of(path)}",
                      lambda p=path: per_step_schedule(assets, p, scheduler, config, calibration_labels))
    for path in sorted(routers_root.glob("schedule_budget_*"), key=budget_of):
        yield Setting(SCHEDULE, f"budget {budget_of(path)}", lambda p=path: trained(assets, p, "serving"))
    for path in sorted(routers_root.glob("forecast_step_budget_*"), key=budget_of):
        yield Setting("E-DiT forecast routers (per-step objective only)", f"budget {budget_of(path)}",
                      lambda p=path: trained(assets, p, "serving"))
    # Earlier router families, one setting each (their own results files have the rest): plain routers (identity
    # skips and widths, no cache) and the previous bundled default (cache-aware, skip-only, reuse).
    for family, cache in (("budget_0.5", None), ("cache_skip_budget_0.4", "serving")):
        path = routers_root / family
        if path.is_dir():
            yield Setting("E-DiT" if cache is None else "E-DiT cache-aware skip-only + cache",
                          "budget 0.5" if cache is None else "budget 0.4, K=2",
                          lambda p=path, c=cache: trained(assets, p, c))


def trained(assets, path, cache=None, pin_widths: bool = False):
    """The reference model with the routers saved at ``path``. ``cache``: None (no cache), "serving" (the cache the
    routers were trained for, K=2 and fallback "run" for cache-aware ones) or a FeatureCacheConfig."""
    model, _, _ = load_reference(assets)
    ec.load(model, path)
    hooks = None
    if cache is not None:
        apply_feature_cache(model, None if cache == "serving" else cache)
        hooks = ElasticCacheHooks(model)
    return (Forced(model, width=1.0) if pin_widths else model), hooks


def per_step_schedule(assets, path, scheduler, config, labels):
    """The routers at ``path`` replaced by their decisions averaged per step over samples (schedule_ablation.py)."""
    from schedule_ablation import ScheduledModel, averaged_schedule
    model, hooks = trained(assets, path, "serving")
    scheduled = ScheduledModel(model, averaged_schedule(model, hooks, scheduler, config, labels), hooks)
    return scheduled, scheduled.hooks


def block_cache(assets, max_reuse: int, action: str = "reuse"):
    """Training-free block cache of this toolkit: every block asks to skip, so each stands in with its last update
    ("reuse") or a first- or second-order forecast from its last two or three ("forecast", "forecast2") up to ``max_reuse`` steps in a row and then
    runs (fallback "run"); a forecast waits until the block has two stored updates (``forecast_min_points``)."""
    model = elastic_base(assets, ec.ElasticConfig(skip_actions=(action,)))
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=max_reuse, fallback="run"))
    return Forced(model, skip=True, width=1.0), ElasticCacheHooks(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--timing-images", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=6,
                        help="timed dense/method pairs per setting (ABBA order, median of the pair ratios)")
    parser.add_argument("--max-static-skip", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--only", default="", help="comma-separated method names to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="where the tables, plots and grids go")
    parser.add_argument("--routers", default=str(RESULTS / "routers"), help="folder of the trained router sets")
    args = parser.parse_args(argv)
    global OUT
    OUT = Path(args.out)
    torch.set_num_threads(args.threads)
    dense_model, scheduler, config = load_reference(args.assets)
    labels = [c for c in range(config.num_classes) for _ in range(args.eval_per_class)]
    calibration_labels = [c for c in range(config.num_classes) for _ in range(2)]
    timing_labels = labels[::max(1, len(labels) // args.timing_images)]
    classifier, real = load_classifier(args.assets), load_digits_split().heldout_images
    with flop_counter() as counter:  # every method's images are sampled under the counter alike
        dense_images = sample(dense_model, scheduler, labels, config, seed=0)
    dense_flops = counter.get_total_flops()
    rows = [dict(method="dense", setting="-", fraction=1.0, speedup=1.0,
                 **score(dense_images, labels, classifier, real, dense_images))]
    grids = {}
    features = {row_key(rows[0]): classifier_features(classifier, dense_images)}
    only = {m.strip() for m in args.only.split(",") if m.strip()}
    builders = {}
    for setting in settings(args, scheduler, config, calibration_labels):
        if only and setting.method not in only:
            continue
        builders[row_key(dict(method=setting.method, setting=setting.label))] = setting.build
        denoiser, hooks = setting.build()
        with flop_counter() as counter:  # counting does not change the computation: one pass gives both
            images = sample(denoiser, scheduler, labels, config, seed=0, hooks=hooks)
        flops = counter.get_total_flops()
        timing = paired_overhead(lambda: sample(dense_model, scheduler, timing_labels, config),
                                 lambda: sample(denoiser, scheduler, timing_labels, config, hooks=hooks),
                                 pairs=args.pairs, warmup=1)
        # pair ratios are method / dense time: the speedup and its interval are their reciprocals
        speedup = 1 / (1 + timing["overhead"])
        low, high = (1 / (1 + o) for o in reversed(timing["interval"]))
        row = dict(method=setting.method, setting=setting.label, fraction=flops / dense_flops, speedup=speedup,
                   speedup_interval=[low, high],
                   **score(images, labels, classifier, real, dense_images))
        rows.append(row)
        features[row_key(row)] = classifier_features(classifier, images)
        print(json.dumps(row), flush=True)
        best = grids.get(setting.method)
        if best is None or abs(row["speedup"] - 2.0) < abs(best[0] - 2.0):
            grids[setting.method] = (row["speedup"], setting.label, images)
    if only:  # a partial run replaces its methods' rows and grids in the previous results, keeps the others
        rows, grids = merge_previous(rows, grids, only)
    def paired_timing(candidate: dict, peer: dict) -> dict | None:
        """Candidate time / peer time, interleaved pairs on the timing images (both rebuilt from this run)."""
        keys = row_key(candidate), row_key(peer)
        if not all(k in builders for k in keys):
            return None
        (run_candidate, candidate_hooks), (run_peer, peer_hooks) = (builders[k]() for k in keys)
        return paired_overhead(lambda: sample(run_peer, scheduler, timing_labels, config, hooks=peer_hooks),
                               lambda: sample(run_candidate, scheduler, timing_labels, config, hooks=candidate_hooks),
                               pairs=2 * args.pairs, warmup=1)

    dominance = dominance_table(rows, features, classifier_features(classifier, real), paired_timing)
    write(rows, grids, labels, args, dominance)
    return 0


def dominance_table(rows, features, real_features, paired_timing=None) -> list[dict]:
    """Per peer setting (``PEERS``), the elastic row that dominates it (``frontier.best_dominating``), with a
    paired FID interval where only FID separates them (images of both rows from this run); where none does, a
    candidate of no more FLOPs that measured slower is timed against the peer directly (``paired_timing``:
    ``frontier.equal_cost_candidates``) and dominates "as fast within timing noise" when that interval reaches
    parity."""
    elastic = [r for r in rows if r["method"] in CANDIDATES]
    router_free = [r for r in rows if r["method"] in ROUTER_FREE]
    table = []
    for peer in (r for r in rows if r["method"] in PEERS):
        # the toolkit's router-free modes stand for it against the other tools' caches (where no router set
        # dominates), not against each other
        candidates = elastic + ([] if peer["method"] in ROUTER_FREE else router_free)
        intervals = {}
        for candidate in candidates:
            keys = row_key(candidate), row_key(peer)
            if ((candidate["speedup"] >= peer["speedup"] or as_cheap(candidate, peer))
                    and candidate["psnr"] >= peer["psnr"] and candidate["fid"] > peer["fid"]
                    and all(k in features for k in keys)):
                intervals[keys] = paired_fid_difference(features[keys[0]], features[keys[1]], real_features)
        found = best_dominating(peer, elastic, intervals)  # routers first: the router-free modes where they fail
        if found is None and peer["method"] not in ROUTER_FREE:
            found = best_dominating(peer, router_free, intervals)
        timed = None
        if found is None and paired_timing is not None:
            for pool in (elastic, [] if peer["method"] in ROUTER_FREE else router_free):
                for candidate, kind in equal_cost_candidates(peer, pool, intervals)[:1]:
                    timing = paired_timing(candidate, peer)
                    print(f"paired timing {row_key(candidate)} vs {row_key(peer)}: {timing}", flush=True)
                    if timing is not None and timing["interval"][0] <= 0.0:
                        found, timed = (candidate, kind), timing
                if found is not None:
                    break
        entry = dict(peer=peer, by=found[0] if found else None, kind=found[1] if found else None)
        if found:
            entry["fid_interval"] = intervals.get((row_key(found[0]), row_key(peer)))
        if timed is not None:
            entry["time_ratio"] = [1 + timed["overhead"]] + [1 + o for o in timed["interval"]]
        table.append(entry)
    return table


def merge_previous(rows, grids, only):
    """Rows of methods not re-run (and their grids) from the last full results, in their original order."""
    previous_rows = json.loads((OUT / "quality.json").read_text()) if (OUT / "quality.json").is_file() else []
    previous_grids = (json.loads((OUT / "quality_grids.json").read_text())
                      if (OUT / "quality_grids.json").is_file() else {})
    kept = [r for r in previous_rows if r["method"] not in only and r["method"] != "dense"]
    merged_grids = {m: tuple(g) for m, g in previous_grids.items() if m not in only}
    merged_grids.update(grids)
    return rows[:1] + kept + rows[1:], merged_grids


def write(rows, grids, labels, args, dominance=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(rows, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["speedup"])
        axes[0].plot([p["speedup"] for p in points], [p["psnr"] for p in points], "o-", label=method)
        axes[1].plot([1 / p["fraction"] for p in points], [p["psnr"] for p in points], "o-", label=method)
    axes[0].set_xlabel("measured wall-clock speedup vs dense (same run)")
    axes[1].set_xlabel("FLOP-ratio speedup (dense FLOPs / executed FLOPs)")
    for ax in axes:
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "frontier.png", dpi=110)
    lines = ["# Speed-fidelity frontier on the reference model", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}` ({args.threads} CPU threads). "
             f"{len(labels)} images ({args.eval_per_class} per class), default steps and guidance, CFG as one batch; "
             f"speedup = dense / method time, the median of {args.pairs} back-to-back pairs on {args.timing_images} images "
             "(ABBA order), with its 95% bootstrap interval."
             + (" Rows of the methods not named in --only are kept from the previous results file." if args.only
                else ""), "",
             "| method | setting | executed FLOP fraction | speedup (wall-clock) | PSNR vs dense (dB) | SSIM | "
             "class accuracy | FID |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = " [{:.2f}, {:.2f}]".format(*r["speedup_interval"]) if r.get("speedup_interval") else ""
        lines.append(f"| {r['method']} | {r['setting']} | {r['fraction']:.3f} | {r['speedup']:.2f}x{spread} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.3f} | {r['fid']:.2f} |")
    lines += ["", "## Does the elastic mode dominate every training-free setting?", "",
              f"Candidates: the rows of {' and '.join(f'`{c}`' for c in CANDIDATES)}; against the other tools' "
              f"settings also this toolkit's router-free modes ({', '.join(f'`{c}`' for c in ROUTER_FREE)}), which "
              "are peers of the routers themselves. A candidate dominates a peer when it is at least as fast, at least "
              "as faithful (PSNR) and no worse in FID: strictly (FID <= the peer's) or within noise (the 95% paired "
              "bootstrap interval of FID(candidate) - FID(peer), same images resampled for both, reaches 0). Where "
              "no candidate measured as fast, one that executes no more FLOPs is timed against the peer directly "
              f"({2 * args.pairs} interleaved pairs); it counts as fast when the 95% interval of its time / the "
              "peer's time reaches 1 (\"as fast within timing noise\", with that interval).", "",
              "| peer | setting | speedup | PSNR | FID | dominated by | speedup | PSNR | FID | how |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in dominance:
        peer, by = entry["peer"], entry["by"]
        head = f"| {peer['method']} | {peer['setting']} | {peer['speedup']:.2f}x | {peer['psnr']:.2f} | {peer['fid']:.2f} |"
        if by is None:
            outside = not GOAL_RANGE[0] <= peer["speedup"] <= GOAL_RANGE[1]
            lines.append(head + (" not dominated (outside the goal's {:g}x-{:g}x) | | | | |".format(*GOAL_RANGE)
                                 if outside else " **not dominated** | | | | |"))
            continue
        how = entry["kind"]
        if entry.get("time_ratio"):
            how += "; equal FLOPs, as fast within timing noise (paired time ratio {:.3f} [{:.3f}, {:.3f}])".format(
                *entry["time_ratio"])
        if entry.get("fid_interval"):
            how += " (FID difference [{:+.2f}, {:+.2f}])".format(*entry["fid_interval"])
        lines.append(head + f" {by['method']}, {by['setting']} | {by['speedup']:.2f}x | {by['psnr']:.2f} | {by['fid']:.2f} | {how} |")
    lines += ["", "![frontier](frontier.png)", "", "Sample grids at the setting closest to 2x measured speedup:", ""]
    grid_files = {}
    for method, (speedup, label, images) in grids.items():
        name = "grid_" + re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_") + ".png"
        if isinstance(images, torch.Tensor):  # else: kept from a previous run, the PNG is already there
            make_grid_png(images, OUT / name, nrow=args.eval_per_class)
        grid_files[method] = (speedup, label, name)
        lines.append(f"- {method} ({label}, {speedup:.2f}x): ![{method}]({name})")
    (OUT / "quality_grids.json").write_text(json.dumps(grid_files, indent=1))
    (OUT / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
