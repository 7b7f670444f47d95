"""Measure the bundled reference model and write benchmarks/results/reference.md (+ grid PNG, metrics JSON).

    PYTHONPATH=. python benchmarks/evaluate_reference.py            # default steps/guidance only (~2 min)
    PYTHONPATH=. python benchmarks/evaluate_reference.py --sweep    # + steps x guidance table (~8 min)

Protocol: 36 samples per class (360, the size of the held-out split), seeds 10_000 + i, class-balanced. FID
is computed in the bundled classifier's feature space against the 360 held-out real digits. The sweep's
selection column is FID against the *train* split, so choosing defaults never looks at held-out data.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference, make_grid_png
from elastic_compile.reference.data import NUM_CLASSES, load_digits_split
from elastic_compile.reference.metrics import class_accuracy, fid, nearest_neighbour_rmse
from elastic_compile.sampling import sample

RESULTS = Path(__file__).resolve().parent / "results"
PER_CLASS = 36
SEED_BASE = 10_000
SWEEP_GUIDANCE = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
SWEEP_STEPS = (5, 10, 20, 50)


def balanced_labels(per_class: int) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def balanced_subset(images: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    picked = [r[torch.randperm(len(r), generator=gen)[:per_class]] for r in rows]
    return images[torch.cat(picked)]


def generate(model, scheduler, config, labels, **overrides):
    start = time.time()
    images = sample(model, scheduler, labels, config, seed=SEED_BASE, **overrides)
    return images, time.time() - start


def loss_summary(log_path: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not records:
        return []
    marks = sorted({0, len(records) // 10, len(records) // 4, len(records) // 2, 3 * len(records) // 4, len(records) - 1})
    return [(records[i]["step"], records[i]["loss_smoothed"]) for i in marks]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also measure a steps x guidance table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render-only", action="store_true",
                   help="rewrite reference.md from the saved reference_metrics.json without sampling")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)

    model, scheduler, config = load_reference()
    if args.render_only:
        metrics = json.loads((RESULTS / "reference_metrics.json").read_text())
        write_report(metrics, model.config, *_training_records(), "reference_grid.png")
        return
    classifier = load_classifier()
    split = load_digits_split()
    labels = balanced_labels(PER_CLASS)
    heldout = split.heldout_images

    images, seconds = generate(model, scheduler, config, labels)
    acc = class_accuracy(classifier, images, labels)
    per_class = [acc.values[labels == c].mean().item() for c in range(NUM_CLASSES)]
    grid_rows = torch.cat([images[labels == c][:8] for c in range(NUM_CLASSES)])
    grid_path = make_grid_png(grid_rows, RESULTS / "reference_grid.png", nrow=8)
    real_grid = torch.cat([split.heldout_images[split.heldout_labels == c][:8] for c in range(NUM_CLASSES)])
    make_grid_png(real_grid, RESULTS / "heldout_grid.png", nrow=8)

    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    untrained = DiTTransformer2DModel.from_config(model.config).eval()
    untrained_images, _ = generate(untrained, scheduler, config, labels)
    noise = torch.randn(heldout.shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    real_train = balanced_subset(split.train_images, split.train_labels, PER_CLASS, seed=0)
    metrics = {
        "steps": config.num_inference_steps, "guidance_scale": config.guidance_scale, "samples": len(labels),
        "class_accuracy": acc.mean, "class_accuracy_per_class": per_class,
        "fid_vs_heldout": fid(classifier, images, heldout),
        "fid_real_train_vs_heldout": fid(classifier, real_train, heldout),
        "fid_untrained_model_vs_heldout": fid(classifier, untrained_images, heldout),
        "fid_noise_vs_heldout": fid(classifier, noise, heldout),
        "untrained_model_accuracy": class_accuracy(classifier, untrained_images, labels).mean,
        "heldout_real_accuracy": class_accuracy(classifier, heldout, split.heldout_labels).mean,
        "nearest_train_rmse_samples": nearest_neighbour_rmse(images, split.train_images).mean,
        "nearest_train_rmse_heldout": nearest_neighbour_rmse(heldout, split.train_images).mean,
        "embedder_parameter_fraction": sum(p.numel() for b in model.transformer_blocks for p in b.norm1.emb.parameters())
        / sum(p.numel() for p in model.parameters()),
        "sampling_seconds": seconds, "ms_per_image": 1000 * seconds / len(labels),
    }

    sweep = []
    if args.sweep:
        for steps in (config.num_inference_steps, *SWEEP_STEPS):
            for scale in SWEEP_GUIDANCE if steps == config.num_inference_steps else (config.guidance_scale,):
                imgs, secs = generate(model, scheduler, config, labels, num_inference_steps=steps, guidance_scale=scale)
                sweep.append({"steps": steps, "guidance_scale": scale,
                              "class_accuracy": class_accuracy(classifier, imgs, labels).mean,
                              "fid_vs_train": fid(classifier, imgs, real_train),
                              "fid_vs_heldout": fid(classifier, imgs, heldout), "seconds": secs})
                print(json.dumps(sweep[-1]), flush=True)
        metrics["sweep"] = sweep

    (RESULTS / "reference_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(metrics, model.config, *_training_records(), grid_path.name)
    print(json.dumps({k: v for k, v in metrics.items() if k != "sweep"}, indent=2))


def _training_records() -> tuple[dict, dict, list]:
    train_meta = json.loads((ASSETS_DIR / "train_config.json").read_text())
    classifier_meta = json.loads((ASSETS_DIR / "classifier" / "config.json").read_text())["training"]
    return train_meta, classifier_meta, loss_summary(ASSETS_DIR / "train_log.jsonl")


def write_report(m: dict, model_config, train: dict, clf: dict, losses: list, grid_name: str) -> None:
    from report_reference import render

    (RESULTS / "reference.md").write_text(render(m, dict(model_config), train, clf, losses, grid_name))


if __name__ == "__main__":
    main()
