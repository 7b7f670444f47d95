"""``elastic-compile record``: record the dense model's sampling trajectories into a sharded store on disk.

What ``elastic-compile train --trajectories DIR`` streams from (train/store.py): rows never need to fit in
memory, and under ``torchrun`` every rank records its share of the generations in parallel.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser("record", help="record dense sampling trajectories into a sharded store "
                                                  "(for train --trajectories)")
    parser.add_argument("--model", default=None, help="diffusers model dir or package.module:factory "
                                                      "(default: the bundled reference model)")
    parser.add_argument("--sampling", default=None, help="dir with scheduler/ and sampling.json "
                                                         "(default: the bundled reference assets)")
    parser.add_argument("--samples-per-class", type=int, default=24, help="generations per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recorded generations (noise and labels)")
    parser.add_argument("--batch-size", type=int, default=64, help="generations per sampler call")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="size at which a shard file is closed")
    parser.add_argument("--out", required=True, help="a new or empty directory for the store")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import elastic_compile as ec

    from ..reference import ASSETS_DIR
    from ..sampling import SamplingConfig
    from ..train import record_class_conditional_trajectories
    from ..train.common import init_distributed
    from .common import load_scheduler, resolve_model

    for name, value in (("--samples-per-class", args.samples_per_class), ("--batch-size", args.batch_size),
                        ("--shard-mb", args.shard_mb)):
        if not value > 0:
            raise ConfigError(f"{name} > 0", f"{value}", "Use e.g. --samples-per-class 24 --batch-size 64.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out as a new or empty directory", f"{out} (exists and is not empty)",
                          "Choose another directory; nothing in it was touched.")
    rank, world = init_distributed()
    model, inputs = resolve_model(args.model or str(ASSETS_DIR / "transformer"))
    ec.transform(model, example_inputs=inputs)   # recording runs it forced dense: the routers play no part
    sampling_dir = Path(args.sampling) if args.sampling else ASSETS_DIR
    sampling = SamplingConfig.load(sampling_dir / "sampling.json")
    scheduler = load_scheduler(sampling_dir / "scheduler", sampling.scheduler)
    store = record_class_conditional_trajectories(model, scheduler, sampling, samples_per_class=args.samples_per_class,
                                                  seed=args.seed, batch_size=args.batch_size, out=out,
                                                  shard_mb=args.shard_mb)
    if rank == 0:
        print(f"recorded {len(store)} rows in {len(store.index['shards'])} shards from {world} process(es) to {out}; "
              f"train with: elastic-compile train --trajectories {out} ...")
    return 0
