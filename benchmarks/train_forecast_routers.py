"""Train the toolkit's best elastic mode on the bundled reference model at several budgets, and measure it.

    python benchmarks/train_forecast_routers.py --budgets 0.25,0.35,0.5 [--save-budget 0.35]

Per budget, on this CPU, data-free (the dense model's own trajectories and samples):

1. transform with skip decisions only (width bucket 1: narrow FFNs cost this model more than they save) and three
   skip actions: reuse the block's last update, or extrapolate it to first or second order (``skip_actions``);
2. per-step cache-aware training (``objective="step"``): every skip action trained as the cache would serve it
   from the dense model's earlier updates; the threshold calibrated to the budget; saved as
   ``results/routers/forecast_step_budget_<b>`` (the per-step-only comparison row of quality.py);
3. rollout training (``objective="rollout"``): whole generations with the cache in the loop, loss on the final
   samples; the threshold calibrated on whole generations; saved as ``results/routers/forecast_budget_<b>``
   (and into the package with ``--save-budget``);
4. evaluation on held-out noise: executed FLOP fraction (per image too), PSNR / SSIM against dense, class accuracy,
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
from elastic_compile.train.rollout import ClassConditionalRollout, calibrate_threshold, serving_cache
from timing import timed_speedup  # benchmarks/timing.py

RESULTS = Path(__file__).resolve().parent / "results"
SKIP_ACTIONS = ("reuse", "forecast", "forecast2")


def fresh_elastic(assets):
    model, scheduler, sampling = load_reference(assets)
    config = ec.ElasticConfig(width_buckets=(1.0,), skip_actions=SKIP_ACTIONS)
    return ec.transform(model, config, example_inputs=synthesize_dit_inputs(model)), scheduler, sampling


def evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real):
    """Served as trained (the cache the routers record), against dense images from the same noise."""
    apply_feature_cache(model)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.25,0.35,0.5")
    parser.add_argument("--max-reuse", type=int, default=3, help="the cache's K: stand-ins in a row at most")
    parser.add_argument("--step-steps", type=int, default=150, help="per-step training steps")
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--rollout-steps", type=int, default=60, help="rollout training steps")
    parser.add_argument("--rollout-batch", type=int, default=8, help="generations per rollout step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples-per-class", type=int, default=8, help="recorded dense generations per class")
    parser.add_argument("--rollout-per-class", type=int, default=8, help="rollout pool: noise seeds per class")
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--save-budget", type=float, default=None, help="bundle this budget's routers")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    budgets = [float(b) for b in args.budgets.split(",")]
    recorder, scheduler, config = fresh_elastic(args.assets)
    start = time.time()
    data = record_class_conditional_trajectories(recorder, scheduler, config,
                                                 samples_per_class=args.samples_per_class, seed=1000)
    record_seconds = time.time() - start
    rollout = ClassConditionalRollout(scheduler, config, per_class=args.rollout_per_class, first_seed=10_000)
    classifier, real = load_classifier(args.assets), load_digits_split().heldout_images
    labels = [c for c in range(config.num_classes) for _ in range(args.eval_per_class)]
    dense_model = load_reference(args.assets)[0]
    dense = generate(dense_model, scheduler, labels, config)
    rows, histograms, logs = [], {}, {}
    for budget in budgets:
        model, _, _ = fresh_elastic(args.assets)
        log = lambda e, b=budget: print(f"  budget {b} step {e.step}: loss {e.loss:.4f} mse {e.distill_mse:.3g} "
                                        f"flops {e.executed_fraction:.3f} ({e.seconds:.0f} s)", flush=True)
        started = time.time()
        step_report = train_routers(model, data, budget=budget, steps=args.step_steps, batch_size=args.step_batch,
                                    lr=args.lr, cache_aware=True, cache_max_reuse=args.max_reuse, log_every=25,
                                    progress=False, log=log)
        calibrate_threshold(model, rollout, budget, serving_cache(model, args.max_reuse))
        step_seconds = time.time() - started
        ec.save(model, out / "routers" / f"forecast_step_budget_{budget}")
        row, _ = evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real)
        rows.append(dict(budget=budget, objective="step", train_seconds=step_seconds, **row))
        print(rows[-1], flush=True)
        rollout_report = train_routers(model, rollout, objective="rollout", budget=budget, steps=args.rollout_steps,
                                       batch_size=args.rollout_batch, lr=args.lr, lr_schedule="constant",
                                       cache_max_reuse=args.max_reuse, log_every=5, progress=False, log=log)
        ec.save(model, out / "routers" / f"forecast_budget_{budget}")
        row, spread = evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real)
        rows.append(dict(budget=budget, objective="step + rollout", train_seconds=time.time() - started, **row))
        print(rows[-1], flush=True)
        histograms[budget] = spread.tolist()
        logs[budget] = dict(step=[vars(e) for e in step_report.history],
                            rollout=[vars(e) for e in rollout_report.history])
        if args.save_budget is not None and abs(budget - args.save_budget) < 1e-9:
            print(f"bundled the routers of budget {budget} in {ec.save(model, Path(args.assets) / 'routers')}")
    write(out, rows, histograms, logs, args, len(data), record_seconds,
          score(dense.images, labels, classifier, real))
    return 0


def write(out: Path, rows, histograms, logs, args, data_rows, record_seconds, dense_scores) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3), sharey=True, squeeze=False)
    for ax, (budget, values) in zip(axes[0], histograms.items()):
        ax.hist(values, bins=20, color="tab:blue")
        ax.axvline(budget, color="tab:red", linestyle="--", label="budget")
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("executed FLOP fraction per image")
    fig.tight_layout()
    fig.savefig(out / "routers_forecast_per_image_histogram.png", dpi=110)
    (out / "routers_forecast_train_log.json").write_text(json.dumps(logs, indent=1))
    lines = [
        "# Forecast routers on the reference model (skip actions, rollout training)", "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}` ({args.threads} CPU "
        f"threads). Data-free: {data_rows} rows from {args.samples_per_class} dense generations per class "
        f"({record_seconds:.0f} s) for per-step training ({args.step_steps} steps, batch {args.step_batch}); "
        f"rollouts: {args.rollout_steps} steps of {args.rollout_batch} whole generations each, from a pool of "
        f"{args.rollout_per_class} noise seeds per class; cache K={args.max_reuse}, fallback 'run'; skip actions "
        f"{', '.join(SKIP_ACTIONS)}; the threshold calibrated to the budget after each stage. Evaluation: "
        f"{args.eval_per_class} images per class on held-out noise, served as trained. Train time: both stages "
        "with calibration, per budget.", "",
        f"Dense: class accuracy {dense_scores['accuracy']:.3f}, FID {dense_scores['fid']:.2f}.", "",
        "| budget | objective | executed FLOP fraction | speedup (same run) | PSNR vs dense (dB) | SSIM | class accuracy "
        "| FID | per-image fraction min / max / std | tau | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['objective']} | {r['executed_fraction']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.3f} | {r['fid']:.2f} | "
                     f"{r['per_image_min']:.3f} / {r['per_image_max']:.3f} / {r['per_image_std']:.3f} | "
                     f"{r['threshold']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "![per-image executed FLOP fraction](routers_forecast_per_image_histogram.png)", ""]
    (out / "routers_forecast.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
