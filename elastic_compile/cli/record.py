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
    text = parser.add_argument_group("through a diffusers pipeline (text-conditioned models)")
    text.add_argument("--pipeline", default=None,
                      help="a diffusers pipeline directory (save_pretrained): record its transformer's inputs "
                           "through the pipeline's own calls, one per prompt, instead of class-conditional sampling")
    text.add_argument("--prompts", default=None, help="with --pipeline: a text file, one prompt per line")
    text.add_argument("--steps", type=int, default=28, help="with --pipeline: denoising steps per call")
    text.add_argument("--guidance-scale", type=float, default=None,
                      help="with --pipeline: the pipeline's guidance_scale (default: the pipeline's own)")
    text.add_argument("--resolution", default=None,
                      help="with --pipeline: image HEIGHTxWIDTH in pixels, e.g. 1024x768 (default: the pipeline's)")
    text.add_argument("--call", default="{}",
                      help="with --pipeline: more keyword arguments of every pipeline call, as a JSON object "
                           "(e.g. '{\"max_sequence_length\": 256}')")
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
    if args.pipeline is not None or args.prompts is not None:
        store = _record_pipeline(args, out)
        if rank == 0:
            print(f"recorded {len(store)} rows in {len(store.index['shards'])} shards from {world} process(es) to "
                  f"{out}; train with: elastic-compile train --model {Path(args.pipeline) / 'transformer'} "
                  f"--trajectories {out} ...")
        return 0
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


def _record_pipeline(args, out: Path):
    """``--pipeline DIR --prompts FILE``: the pipeline's transformer made elastic from one captured call, then
    one recorded pipeline call per prompt (seeded ``--seed + i``, latents out: no decoding)."""
    import torch

    import elastic_compile as ec

    from ..train import record_pipeline_trajectories
    from .common import load_pipeline, parse_call, parse_resolution

    if args.pipeline is None or args.prompts is None:
        raise ConfigError("--pipeline and --prompts together", f"only {'--pipeline' if args.pipeline else '--prompts'}",
                          "Pass a diffusers pipeline directory and a text file with one prompt per line.")
    if args.steps < 1:
        raise ConfigError("--steps >= 1", f"{args.steps}", "Use e.g. --steps 28.")
    prompts_file = Path(args.prompts)
    if not prompts_file.is_file():
        raise ConfigError("--prompts as a text file, one prompt per line", f"{prompts_file} (no such file)",
                          "Write the prompts to record into a file.")
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("at least one prompt in --prompts", f"{prompts_file} (no non-empty line)",
                          "Write one prompt per line.")
    extra = parse_call(args.call)
    parse_resolution(args.resolution)   # checked before the pipeline loads
    pipe = load_pipeline(Path(args.pipeline))
    options = {"num_inference_steps": args.steps, "output_type": "latent", **extra}
    options.update(parse_resolution(args.resolution))
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    calls = [dict(options, prompt=prompt, generator=torch.Generator().manual_seed(args.seed + i))
             for i, prompt in enumerate(prompts)]
    first = {k: v for k, v in calls[0].items() if k != "generator"}
    pipe.transformer = ec.transform(pipe.transformer, example_inputs=ec.capture_inputs(pipe, **first))
    return record_pipeline_trajectories(pipe, calls, out=out, shard_mb=args.shard_mb)
