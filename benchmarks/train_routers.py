"""Train E-DiT routers on the bundled reference model at several budgets and measure what they deliver.

    python benchmarks/train_routers.py                      # budgets 0.7, 0.5, 0.4 (writes results/routers.md)

For every budget: routers trained data-free (the dense model's own trajectories) on this CPU, then a sampling
run of the evaluation set: executed FLOP fraction (ec.stats, averaged over every denoiser call), fidelity to
dense (PSNR/SSIM of final samples from the same noise), class accuracy and classifier-feature FID, wall-clock
ratio dense/elastic measured interleaved in the same run, and the per-image spread of executed compute
(histogram). Every budget's routers are saved to results/routers/budget_<b>/ (used by quality.py); those of
budget 0.5 also into the package (elastic_compile/assets/reference/routers/).

    python benchmarks/train_routers.py --cache-aware        # writes results/routers_cache.md

trains the routers for serving with the feature cache (a skip reuses the block's update from the previous step,
``train_routers(..., cache_aware=True)``) and evaluates them with the cache on (K=2, fallback "run"); their routers go to
results/routers/cache_budget_<b>/ and, with ``--save-budget``, into the package.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import elastic_compile as ec
from elastic_compile.cli.common import synthesize_dit_inputs
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference
from elastic_compile.reference.data import load_digits_split
from elastic_compile.reference.evaluate import generate, score
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
from elastic_compile.sampling import sample
from elastic_compile.train import record_class_conditional_trajectories, train_routers
from timing import timed_speedup  # benchmarks/timing.py

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_elastic(assets, config: ec.ElasticConfig | None = None):
    model, scheduler, sampling = load_reference(assets)
    return ec.transform(model, config, example_inputs=synthesize_dit_inputs(model)), scheduler, sampling


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.7,0.5,0.4")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples-per-class", type=int, default=16, help="training trajectories per class")
    parser.add_argument("--eval-per-class", type=int, default=10, help="evaluation images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--save-budget", type=float, default=None,
                        help="budget whose routers go into the package (default 0.5; none with --cache-aware)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache-aware", action="store_true",
                        help="train skips as cache reuse and evaluate with the feature cache (K=2)")
    parser.add_argument("--max-reuse", type=int, default=2, help="feature cache K for --cache-aware evaluation")
    parser.add_argument("--skip-only", action="store_true", help="routers decide skips only (width bucket 1.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    prefix = ("cache_" if args.cache_aware else "") + ("skip_" if args.skip_only else "")
    elastic_config = ec.ElasticConfig(width_buckets=(1.0,)) if args.skip_only else None
    if args.save_budget is None and not args.cache_aware:
        args.save_budget = 0.5

    recorder, scheduler, config = fresh_elastic(args.assets)
    start = time.time()
    data = record_class_conditional_trajectories(recorder, scheduler, config, samples_per_class=args.samples_per_class,
                                                 seed=1000)
    record_seconds = time.time() - start
    print(f"recorded {len(data)} training rows in {record_seconds:.0f} s", flush=True)

    classifier = load_classifier(args.assets)
    real = load_digits_split().heldout_images
    labels = [c for c in range(config.num_classes) for _ in range(args.eval_per_class)]
    dense_model = load_reference(args.assets)[0]
    dense = generate(dense_model, scheduler, labels, config)
    dense_scores = score(dense.images, labels, classifier, real)
    rows, histograms, logs = [], {}, {}
    timing_labels = labels[::max(1, len(labels) // 20)]
    for budget in budgets:
        model, _, _ = fresh_elastic(args.assets, elastic_config)
        report = train_routers(model, data, budget=budget, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               seed=0, log_every=50, progress=False, cache_aware=args.cache_aware, cache_max_reuse=args.max_reuse,
                               log=lambda e: print(f"  budget {budget} step {e.step}: mse {e.distill_mse:.4f} "
                                                   f"flops {e.executed_fraction:.3f}", flush=True))
        hooks = None
        if args.cache_aware:
            apply_feature_cache(model, FeatureCacheConfig(max_reuse=args.max_reuse, fallback="run"))
            hooks = ElasticCacheHooks(model)
        result = generate(model, scheduler, labels, config, hooks=hooks)
        quality = score(result.images, labels, classifier, real, dense.images)
        _, _, speedup = timed_speedup(lambda: sample(dense_model, scheduler, timing_labels, config),
                                      lambda: sample(model, scheduler, timing_labels, config, hooks=hooks), repeats=3)
        spread = result.per_image_fraction
        rows.append(dict(budget=budget, train_seconds=report.seconds, steps=report.steps,
                         executed_fraction=result.executed_fraction, speedup=speedup,
                         per_image_min=float(spread.min()), per_image_max=float(spread.max()),
                         per_image_std=float(spread.std()), **quality))
        histograms[budget] = spread.tolist()
        logs[budget] = [vars(e) for e in report.history]
        print(rows[-1], flush=True)
        ec.save(model, out / "routers" / f"{prefix}budget_{budget}")
        if args.save_budget is not None and abs(budget - args.save_budget) < 1e-9:
            saved = ec.save(model, Path(args.assets) / "routers")
            print(f"saved routers for budget {budget} to {saved}")
    write_results(out, rows, dense_scores, histograms, logs, args, len(data), record_seconds, prefix)
    return 0


def write_results(out: Path, rows, dense_scores, histograms, logs, args, data_rows, record_seconds, prefix) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3), sharey=True)
    for ax, (budget, values) in zip(list(axes) if len(histograms) > 1 else [axes], histograms.items()):
        ax.hist(values, bins=20, color="tab:blue")
        ax.axvline(budget, color="tab:red", linestyle="--", label="budget")
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("executed FLOP fraction per image")
    fig.tight_layout()
    stem = "routers_" + prefix.rstrip("_") if prefix else "routers"
    fig.savefig(out / f"{stem}_per_image_histogram.png", dpi=110)
    (out / f"{stem}_train_log.json").write_text(json.dumps(logs, indent=1))
    served = (f" Cache-aware: skips trained and served as reuse of the previous step's block update (feature cache, "
              f"K={args.max_reuse}, fallback 'run': a skip with no usable update runs the block)."
              if args.cache_aware else " Skips trained and served as identity (no cache).")
    lines = [
        "# Router training on the reference model" + (" (cache-aware)" if args.cache_aware else "")
        + (" (skip decisions only)" if args.skip_only else ""),
        "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}` "
        f"({args.threads} CPU threads). Data-free: {data_rows} rows recorded from {args.samples_per_class} dense "
        f"generations per class in {record_seconds:.0f} s; teacher = the dense model. {args.steps} steps, global "
        f"batch {args.batch_size}, Adam lr {args.lr}. Evaluation: {args.eval_per_class} images per class, default "
        "steps and guidance, same noise for dense and elastic." + served,
        "",
        f"Dense reference: class accuracy {dense_scores['accuracy']:.3f}, FID {dense_scores['fid']:.2f}.",
        "",
        "| budget | executed FLOP fraction | wall-clock speedup (same run) | PSNR vs dense (dB) | SSIM | class accuracy "
        "| FID | per-image fraction min / max / std | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['executed_fraction']:.3f} | {r['speedup']:.2f}x | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r['accuracy']:.3f} | {r['fid']:.2f} | {r['per_image_min']:.3f} / "
                     f"{r['per_image_max']:.3f} / {r['per_image_std']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", f"![per-image executed FLOP fraction]({stem}_per_image_histogram.png)", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
