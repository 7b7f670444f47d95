"""Serve one trained router set at other budgets by moving only its run threshold: no retraining.

    python benchmarks/recalibrate_routers.py --routers results/routers/forecast_budget_0.6 --max-reuse 1 \
        --budgets 0.54,0.55,0.56 [--save results/routers]

Why: rollout training below about 0.6 at K=1 ran above its budget and the threshold then cut back to decisions
the stand-in choices were not trained with (``results/routers_forecast.md``); a set trained where training holds
its budget, with the threshold raised a little, drops first the (block, step, sample) calls its routers were
least sure to run. Each budget is calibrated on the rollout pool (training noise, as ``calibrate_threshold`` does
after training) and evaluated like ``train_forecast_routers.py``: held-out noise, served as trained, against the
dense images from the same noise. ``--save`` writes each recalibrated set as ``forecast_budget_<b>`` (the name
``quality.py`` looks for) unless one exists.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import elastic_compile as ec  # noqa: E402
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference  # noqa: E402
from elastic_compile.reference.data import load_digits_split  # noqa: E402
from elastic_compile.reference.evaluate import generate  # noqa: E402
from elastic_compile.train.rollout import ClassConditionalRollout, calibrate_threshold, serving_cache  # noqa: E402
from train_forecast_routers import evaluate, fresh_elastic  # noqa: E402  (fresh_elastic: the sampling config)

COLUMNS = ("budget", "executed_fraction", "speedup", "psnr", "ssim", "accuracy", "fid", "threshold")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", required=True, help="a router set saved by ec.save")
    parser.add_argument("--max-reuse", type=int, required=True, help="the K the set was trained with")
    parser.add_argument("--budgets", required=True, help="comma-separated executed-FLOP budgets")
    parser.add_argument("--rollout-per-class", type=int, default=8, help="calibration pool: noise seeds per class")
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--assets", default=str(ASSETS_DIR))
    parser.add_argument("--save", default=None, help="folder to save each recalibrated set in")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, scheduler, config = fresh_elastic(args.assets)
    rollout = ClassConditionalRollout(scheduler, config, per_class=args.rollout_per_class, first_seed=10_000)
    classifier, real = load_classifier(args.assets), load_digits_split().heldout_images
    labels = [c for c in range(config.num_classes) for _ in range(args.eval_per_class)]
    dense_model = load_reference(args.assets)[0]
    dense = generate(dense_model, scheduler, labels, config)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        model = ec.load(load_reference(args.assets)[0], args.routers, cache="off")
        calibrate_threshold(model, rollout, budget, serving_cache(model, args.max_reuse))
        row, _ = evaluate(model, dense_model, dense, scheduler, config, labels, classifier, real, args.max_reuse)
        row["budget"] = budget
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS)
              + " |", flush=True)
        if args.save:
            target = Path(args.save) / f"forecast_budget_{budget}"
            if target.exists():
                print(f"  {target} exists: not saved")
            else:
                ec.save(model, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
