"""Train the toolkit's best elastic mode on the bundled reference model at several budgets, and measure it.

    python benchmarks/train_forecast_routers.py --settings 0.6:1:forecast2,0.4:2:forecast2,0.3:3:forecast [--save-budget 0.4]

A setting is ``budget:K:action``. Per setting, on this CPU, data-free (the dense model's own samples):

1. transform with skip decisions only (width bucket 1: narrow FFNs cost this model more than they save) and three
   skip actions: reuse the block's last update, or extrapolate it to first or second order (``skip_actions``);
2. start from the training-free block forecast (``start_from_block_cache``: every router asks for ``action``, so
   each block forecasts up to K calls in a row and then runs); evaluated as the "init" row, which is exactly the
   router-free block forecast at that K;
3. rollout training (``objective="rollout"``): whole generations with the cache in the loop, loss on the final
   samples, a Lagrange multiplier holding the budget; the threshold calibrated on whole generations to the
   budget; saved as ``results/routers/forecast_budget_<b>`` (and into the package with ``--save-budget``);
4. with ``--step-baseline``: the same model trained with the per-step objective only (cache-aware distillation on
   recorded dense trajectories, the threshold calibrated likewise), saved as ``forecast_step_budget_<b>``;
5. evaluation on held-out noise: executed FLOP fraction (per image too), PSNR / SSIM against dense, class accuracy,
   FID, wall-clock speedup against dense measured interleaved in this run.

Writes ``results/routers_forecast.md`` (+ per-image histogram and training logs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks, apply_feature_cache
from elastic_compile.cli.common import synthesize_dit_inputs
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference
from elastic_compile.reference.data import load_digits_split
from elastic_compile.reference.evaluate import generate, score
from elastic_compile.sampling import sample
from elastic_compile.train import record_class_conditional_trajectories, train_routers
from elastic_compile.train.rollout import (ClassConditionalRollout, calibrate_threshold, serving_cache,
                                           start_from_block_cache)
from timing import timed_speedup  # benchmarks/timing.py

RESULTS = Path(__file__).resolve().parent / "results"
SKIP_ACTIONS = ("reuse", "forecast", "forecast2")


def fresh_elastic(assets):
    model, scheduler, sampling = load_reference(assets)
    config = ec.ElasticConfig(width_buckets=(1.0,), skip_actions=SKIP_ACTIONS)
    return ec.transform(model, config, example_inputs=synthesize_dit_inputs(model)), scheduler, sampling


def evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real, max_reuse):
    """Served as trained (the cache the routers record), against dense images from the same noise."""
    apply_feature_cache(model, serving_cache(model, max_reuse))
    hooks = ElasticCacheHooks(model)
    result = generate(model, scheduler, labels, config, hooks=hooks)
    timing_labels = labels[::max(1, len(labels) // 20)]
    _, _, speedup = timed_speedup(lambda: sample(dense_model, scheduler, timing_labels, config),
                                  lambda: sample(model, scheduler, timing_labels, config, hooks=hooks), repeats=3)
    ec.cache.remove_feature_cache(model)
    spread = result.per_image_fraction
    return dict(executed_fraction=result.executed_fraction, speedup=speedup, per_image_min=float(spread.min()),
                per_image_max=float(spread.max()), per_image_std=float(spread.std()),
                threshold=ec.state.state_of(model).config.threshold,
                **score(result.images, labels, classifier, real, dense.images)), spread


def parse_settings(text: str):
    settings = []
    for item in text.split(","):
        budget, max_reuse, action = item.split(":")
        settings.append((float(budget), int(max_reuse), action))
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="0.6:1:forecast2,0.4:2:forecast2,0.3:3:forecast,0.22:4:forecast",
                        help="budget:K:action, comma-separated (K: the cache's stand-ins in a row at most)")
    parser.add_argument("--rollout-steps", type=int, default=40, help="rollout training steps")
    parser.add_argument("--rollout-batch", type=int, default=8, help="generations per rollout step")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--run-logit", type=float, default=-0.5, help="the routers' initial run logit")
    parser.add_argument("--dual-init", type=float, default=12.0)
    parser.add_argument("--dual-step", type=float, default=5.0)
    parser.add_argument("--recalibrate-every", type=int, default=0,
                        help="recalibrate the run threshold to the budget every N rollout steps (hard decisions), "
                             "so training sees the served decisions; 0: only after training")
    parser.add_argument("--step-baseline", action="store_true", help="also train per-step-only routers")
    parser.add_argument("--step-steps", type=int, default=150, help="per-step training steps (baseline)")
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=8, help="recorded dense generations per class")
    parser.add_argument("--rollout-per-class", type=int, default=8, help="rollout pool: noise seeds per class")
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--init-from", default=None,
                        help="start every setting from this saved router set (its weights and threshold) instead "
                             "of the router-free block forecast")
    parser.add_argument("--save-budget", type=float, default=None, help="bundle this budget's routers")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = parse_settings(args.settings)
    _, scheduler, config = fresh_elastic(args.assets)
    rollout = ClassConditionalRollout(scheduler, config, per_class=args.rollout_per_class, first_seed=10_000)
    classifier, real = load_classifier(args.assets), load_digits_split().heldout_images
    labels = [c for c in range(config.num_classes) for _ in range(args.eval_per_class)]
    dense_model = load_reference(args.assets)[0]
    dense = generate(dense_model, scheduler, labels, config)
    rows, histograms, logs = [], {}, {}

    def record(setting, objective, seconds, model, max_reuse):
        row, spread = evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real, max_reuse)
        rows.append(dict(setting=setting, objective=objective, train_seconds=seconds, **row))
        print(rows[-1], flush=True)
        return spread

    for budget, max_reuse, action in settings:
        setting = f"{budget}:{max_reuse}:{action}"
        if args.init_from:
            model = ec.load(load_reference(args.assets)[0], args.init_from, cache="off")
        else:
            model, _, _ = fresh_elastic(args.assets)
        log = lambda e, b=budget, m=model: print(
            f"  budget {b} step {e.step}: loss {e.loss:.4f} mse {e.distill_mse:.3g} flops {e.executed_fraction:.3f} "
            f"tau {ec.state.state_of(m).config.threshold:.4f} ({e.seconds:.0f} s)", flush=True)
        if not args.init_from:
            start_from_block_cache(model, action, run_logit=args.run_logit)
        record(setting, f"init (= {args.init_from or 'block forecast'}, no training)", 0.0, model, max_reuse)
        started = time.time()
        report = train_routers(model, rollout, objective="rollout", budget=budget, steps=args.rollout_steps,
                               batch_size=args.rollout_batch, lr=args.lr, lr_schedule="constant",
                               cache_max_reuse=max_reuse, dual_init=args.dual_init, dual_step=args.dual_step,
                               log_every=5, progress=False, log=log, recalibrate_every=args.recalibrate_every)
        seconds = time.time() - started
        ec.save(model, out / "routers" / f"forecast_budget_{budget}")
        histograms[setting] = record(setting, "rollout", seconds, model, max_reuse).tolist()
        logs[setting] = dict(rollout=[vars(e) for e in report.history])
        if args.save_budget is not None and abs(budget - args.save_budget) < 1e-9:
            print(f"bundled the routers of budget {budget} in {ec.save(model, Path(args.assets) / 'routers')}")
    if args.step_baseline:
        recorder, _, _ = fresh_elastic(args.assets)
        data = record_class_conditional_trajectories(recorder, scheduler, config,
                                                     samples_per_class=args.samples_per_class, seed=1000)
        for budget, max_reuse, action in settings:
            model, _, _ = fresh_elastic(args.assets)
            started = time.time()
            report = train_routers(model, data, budget=budget, steps=args.step_steps, batch_size=args.step_batch,
                                   lr=3e-3, cache_aware=True, cache_max_reuse=max_reuse, log_every=25,
                                   progress=False)
            calibrate_threshold(model, rollout, budget, serving_cache(model, max_reuse))
            ec.save(model, out / "routers" / f"forecast_step_budget_{budget}")
            record(f"{budget}:{max_reuse}", "per-step only", time.time() - started, model, max_reuse)
    write(out, rows, histograms, logs, args, score(dense.images, labels, classifier, real))
    return 0


def write(out: Path, rows, histograms, logs, args, dense_scores) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3), sharey=True, squeeze=False)
    for ax, (setting, values) in zip(axes[0], histograms.items()):
        ax.hist(values, bins=20, color="tab:blue")
        ax.axvline(float(setting.split(":")[0]), color="tab:red", linestyle="--", label="budget")
        ax.set_title(f"budget:K:action {setting}")
        ax.set_xlabel("executed FLOP fraction per image")
    fig.tight_layout()
    fig.savefig(out / "routers_forecast_per_image_histogram.png", dpi=110)
    (out / "routers_forecast_train_log.json").write_text(json.dumps(logs, indent=1))
    lines = [
        "# Forecast routers on the reference model (skip actions, rollout training)", "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}` ({args.threads} CPU "
        f"threads). Data-free: rollouts of {args.rollout_steps} steps of {args.rollout_batch} whole generations "
        f"each, from a pool of {args.rollout_per_class} noise seeds per class, lr {args.lr}, initial multiplier "
        f"{args.dual_init} (step {args.dual_step}); cache fallback 'run'; skip actions {', '.join(SKIP_ACTIONS)}; "
        "every setting starts from the router-free block forecast (its 'init' row) and its threshold is "
        f"calibrated to the budget after training. Evaluation: {args.eval_per_class} images per class on held-out "
        "noise, served as trained; speedup against dense, interleaved, in this run.", "",
        f"Dense: class accuracy {dense_scores['accuracy']:.3f}, FID {dense_scores['fid']:.2f}.", "",
        "| budget:K:action | objective | executed FLOP fraction | speedup (same run) | PSNR vs dense (dB) | SSIM "
        "| class accuracy | FID | per-image fraction min / max / std | tau | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['objective']} | {r['executed_fraction']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.3f} | {r['fid']:.2f} | "
                     f"{r['per_image_min']:.3f} / {r['per_image_max']:.3f} / {r['per_image_std']:.3f} | "
                     f"{r['threshold']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "![per-image executed FLOP fraction](routers_forecast_per_image_histogram.png)", ""]
    (out / "routers_forecast.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
