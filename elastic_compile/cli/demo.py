"""``elastic-compile demo``: the bundled reference DiT, dense vs elastic, side by side in a few minutes on a CPU."""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="generate digits with the bundled model, dense vs elastic, and compare")
    parser.add_argument("--out", default="elastic-demo", help="folder for the side-by-side image (default ./elastic-demo)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (10 classes)")
    parser.add_argument("--cache", action="store_true",
                        help="also run the elastic model with the block feature cache (K=2) on top of its routers; "
                             "routers trained cache-aware (the bundled ones) are always served with their cache")
    parser.add_argument("--rounds", type=int, default=2, help="timed dense/elastic rounds (medians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.set_defaults(handler=run)


def describe_cache(model) -> str:
    from ..state import state_of
    config = state_of(model).cache.config
    return f"K={config.max_reuse}, fallback '{config.fallback}'"


def run(args) -> int:
    import torch

    import elastic_compile as ec
    from ..cache import (ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache, remove_feature_cache,
                         serving_cache_hooks)
    from ..reference import ASSETS_DIR, load_classifier, load_reference
    from ..reference.data import load_digits_split
    from ..reference.evaluate import generate, score
    from ..sampling.images import difference, save_side_by_side
    from .common import require, synthesize_dit_inputs

    require(args.per_class, "--per-class", 1)
    require(args.rounds, "--rounds", 1)
    require(args.threads, "--threads", 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    dense_model, scheduler, config = load_reference()
    elastic_model, _, _ = load_reference()
    routers = ASSETS_DIR / "routers"
    if (routers / "elastic.json").is_file():
        ec.load(elastic_model, routers)
        origin = f"trained routers from {routers}"
    else:
        ec.transform(elastic_model, example_inputs=synthesize_dit_inputs(elastic_model))
        origin = "untrained routers (no bundled routers found): the elastic model runs dense"
    elastic_hooks = serving_cache_hooks(elastic_model)
    if elastic_hooks is not None:
        origin += f" (trained cache-aware: served with the block feature cache, {describe_cache(elastic_model)})"
    print(f"reference DiT: {sum(p.numel() for p in dense_model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(ec.report(elastic_model).blocks)} elastic blocks, {origin}")
    if args.cache and elastic_hooks is not None:
        print("--cache: the elastic model already runs with the feature cache its routers were trained for; "
              "no separate row")
    labels = [c for c in range(config.num_classes) for _ in range(args.per_class)]

    timings = {"dense": [], "elastic": []}
    results = {}
    for round_index in range(max(1, args.rounds)):
        for name, model in (("dense", dense_model), ("elastic", elastic_model)):
            print(f"round {round_index + 1}: {name} ({len(labels)} images, {config.num_inference_steps} steps)")
            start = time.perf_counter()
            results[name] = generate(model, scheduler, labels, config, progress=True,
                                     hooks=elastic_hooks if name == "elastic" else None)
            timings[name].append(time.perf_counter() - start)
    if args.cache and elastic_hooks is None:
        apply_feature_cache(elastic_model, FeatureCacheConfig(max_reuse=2))
        print("elastic + feature cache")
        results["elastic + cache"] = generate(elastic_model, scheduler, labels, config,
                                              hooks=ElasticCacheHooks(elastic_model), progress=True)
        timings["elastic + cache"] = [results["elastic + cache"].seconds]
        remove_feature_cache(elastic_model)
    classifier = load_classifier()
    real = load_digits_split().heldout_images
    dense_seconds = statistics.median(timings["dense"])
    dense_images = results["dense"].images
    print()
    print(f"{'model':<18}{'FLOP fraction':>14}{'speedup':>10}{'accuracy':>10}{'FID':>8}{'PSNR vs dense':>15}")
    for name, result in results.items():
        quality = score(result.images, labels, classifier, real, None if name == "dense" else dense_images)
        speedup = dense_seconds / statistics.median(timings[name])
        fraction = 1.0 if result.executed_fraction is None else result.executed_fraction
        psnr = f"{quality['psnr']:.1f} dB" if "psnr" in quality else "-"
        print(f"{name:<18}{fraction:>14.3f}{speedup:>9.2f}x{quality['accuracy']:>10.3f}{quality['fid']:>8.2f}{psnr:>15}")
    print(f"\nspeedup: median wall-clock of {len(timings['dense'])} interleaved rounds in this run; "
          "FLOP fraction: executed / dense (elastic_compile.stats, averaged over the generation's steps).")
    panels = {name: result.images for name, result in results.items()}
    panels["difference"] = difference(results["elastic"].images, dense_images)
    path = save_side_by_side(panels, out / "dense_vs_elastic.png", nrow=args.per_class)
    print(f"samples, one row per class ({' | '.join(panels)}): {path}")
    return 0
