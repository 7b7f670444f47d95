"""``elastic-compile train``: train routers under a compute budget (data-free by default) and save them."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the routers of an elastic model by distillation")
    parser.add_argument("--model", default=None, help="diffusers model dir or package.module:factory "
                                                      "(default: the bundled reference model)")
    parser.add_argument("--routers", help="start from this elastic artifact (ec.save) instead of untrained routers")
    parser.add_argument("--sampling", default=None, help="dir with scheduler/ and sampling.json for data-free "
                                                         "trajectories (default: the bundled reference assets)")
    parser.add_argument("--data", help="a TrajectoryDataset.save file (.safetensors), or torch.save of a list of "
                                       "keyword-argument batches of tensors (read with weights_only=True)")
    parser.add_argument("--trajectories", help="a store written by `elastic-compile record --out DIR`: streamed "
                                               "from disk in rank-disjoint seeded epochs instead of recorded in memory")
    parser.add_argument("--samples-per-class", type=int, default=24, help="data-free: generations per class")
    parser.add_argument("--budget", type=float, default=0.5, help="target executed FLOP fraction")
    parser.add_argument("--steps", type=int, default=400, help="optimisation steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="router learning rate (Adam)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and of the trajectories")
    parser.add_argument("--budget-weight", type=float, default=10.0, help="weight of the squared compute-budget deviation")
    parser.add_argument("--cache-aware", action="store_true",
                        help="train skips as feature-cache reuse (serve with FeatureCacheConfig(fallback='run'))")
    parser.add_argument("--max-reuse", type=int, default=2, help="with --cache-aware: the cache's K at serving time")
    parser.add_argument("--objective", choices=("step", "rollout", "step+rollout"), default="step",
                        help="per-call distillation on recorded trajectories ('step'), whole generations with the "
                             "feature cache in the loop ('rollout', implies the cache), or the first then the second")
    parser.add_argument("--rollout-steps", type=int, default=40, help="rollout objective: training steps")
    parser.add_argument("--rollout-batch", type=int, default=8, help="rollout objective: generations per step")
    parser.add_argument("--rollout-per-class", type=int, default=8, help="rollout objective: noise seeds per class")
    parser.add_argument("--rollout-lr", type=float, default=5e-3, help="rollout objective: learning rate")
    parser.add_argument("--dual-init", type=float, default=12.0,
                        help="rollout objective: the budget multiplier's start (log-MSE per unit of FLOP fraction)")
    parser.add_argument("--dual-step", type=float, default=5.0, help="rollout objective: the multiplier's step")
    parser.add_argument("--skip-actions", default="reuse",
                        help="comma-separated stand-ins a skipped block may take with the cache: reuse, forecast, "
                             "forecast2 (more than one: the routers choose per sample); new routers only")
    parser.add_argument("--widths", default="0.25,0.5,0.75,1.0", help="MLP width buckets (new routers only)")
    parser.add_argument("--start-from-cache", action="store_true",
                        help="rollout objective without a step stage: start the routers as the training-free block "
                             "cache (every block asks to skip) instead of 'run everything'")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (memory of one block, not all)")
    parser.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                        help="run the frozen base in this dtype (torch.autocast); routers stay float32")
    parser.add_argument("--train-base", action="store_true", help="fine-tune the base weights too")
    parser.add_argument("--shard-base", action="store_true",
                        help="under torchrun: shard the frozen base across the processes (FSDP2) instead of "
                             "replicating it (DDP); routers train the same; not with --train-base")
    parser.add_argument("--base-lr", type=float, default=1e-5, help="learning rate of the base weights (with base fine-tuning)")
    parser.add_argument("--log-every", type=int, default=25, help="log every N steps")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="every N steps: save the routers and the run's state (resumable, written atomically)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out (same options; bitwise-equal to an uninterrupted run)")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, final artifact, report)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    import elastic_compile as ec
    from tqdm.auto import tqdm

    from ..reference import ASSETS_DIR
    from ..sampling import SamplingConfig
    from ..train import record_class_conditional_trajectories, train_routers
    from ..train.distill import check_train_options
    from ..train.rollout import ClassConditionalRollout, start_from_block_cache
    from .common import load_scheduler, resolve_model, writable_output

    # Every option is checked before the minutes of recording and training that would end in an error.
    check_train_options(budget=args.budget, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                        budget_weight=args.budget_weight, cache_max_reuse=args.max_reuse, base_lr=args.base_lr,
                        log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    if args.resume and args.checkpoint_every < 1:
        raise ConfigError("--checkpoint-every N >= 1 with --resume", f"{args.checkpoint_every}",
                          "Pass the --checkpoint-every of the run being resumed.")
    if args.shard_base and args.train_base:
        raise ConfigError("a frozen base with --shard-base", "--train-base too",
                          "Fine-tune the base without --shard-base, or train the routers only.")
    if args.samples_per_class < 1:
        raise ConfigError("--samples-per-class >= 1", f"{args.samples_per_class}", "Use e.g. 24.")
    out = Path(args.out)
    writable_output(out / "train_report.json", "--out")
    if args.data and args.trajectories:
        raise ConfigError("one of --data and --trajectories", "both", "Pass the one to train on.")
    data = _load_data(args.data) if args.data else None
    if args.trajectories:
        from ..train import TrajectoryStore
        data = TrajectoryStore(args.trajectories)
    model_spec = args.model or str(ASSETS_DIR / "transformer")
    model, inputs = resolve_model(model_spec)
    if inputs is None and not args.routers:
        inputs = _example_inputs_from(data, model_spec)
    torch.manual_seed(args.seed)   # new routers' initial weights: the same options give the same run
    if args.routers:
        ec.load(model, args.routers)
    else:
        config = ec.ElasticConfig(width_buckets=tuple(float(w) for w in args.widths.split(",")),
                                  skip_actions=tuple(a.strip() for a in args.skip_actions.split(",") if a.strip()))
        ec.transform(model, config, example_inputs=inputs)
    sampling_dir = Path(args.sampling) if args.sampling else ASSETS_DIR
    sampling = SamplingConfig.load(sampling_dir / "sampling.json")
    scheduler = load_scheduler(sampling_dir / "scheduler", sampling.scheduler)
    stages = args.objective.split("+")

    def log(entry):
        tqdm.write(f"step {entry.step:>5}  loss {entry.loss:.5f}  mse {entry.distill_mse:.5g}  "
                   f"budget term {entry.budget_term:.5f}  executed FLOPs {entry.executed_fraction:.3f}")
    common = dict(budget=args.budget, lr=args.lr, seed=args.seed, budget_weight=args.budget_weight,
                  cache_max_reuse=args.max_reuse, log_every=args.log_every, checkpoint_dir=out,
                  checkpoint_every=args.checkpoint_every, log=log, resume=args.resume,
                  activation_checkpointing=args.activation_checkpointing, autocast=args.autocast,
                  shard_base=args.shard_base)
    reports = []
    if "step" in stages:
        if data is None:
            print(f"recording {args.samples_per_class} dense generations per class ...")
            data = record_class_conditional_trajectories(model, scheduler, sampling,
                                                         samples_per_class=args.samples_per_class, seed=args.seed)
        reports.append(train_routers(model, data, steps=args.steps, batch_size=args.batch_size,
                                     cache_aware=args.cache_aware or "rollout" in stages, train_base=args.train_base,
                                     base_lr=args.base_lr, **common))
    if "rollout" in stages:
        if args.start_from_cache and "step" not in stages:
            start_from_block_cache(model, run_logit=-0.5)  # just below tau 0.5: training moves it either way
        rollout = ClassConditionalRollout(scheduler, sampling, per_class=args.rollout_per_class)
        rollout_options = {**common, "lr": args.rollout_lr}
        reports.append(train_routers(model, rollout, objective="rollout", steps=args.rollout_steps,
                                     batch_size=args.rollout_batch, lr_schedule="constant", dual_init=args.dual_init,
                                     dual_step=args.dual_step, **rollout_options))
    (out / "train_report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    final = reports[-1].final
    print(f"done in {sum(r.seconds for r in reports):.0f} s: executed FLOP fraction {final.executed_fraction:.3f}, "
          f"distillation MSE {final.distill_mse:.5g}; routers saved to {out / 'final'}")
    return 0


def _load_data(path: str):
    """``--data``: a TrajectoryDataset file, or a list of keyword-argument batches (no pickled objects)."""
    from ..train import TrajectoryDataset
    from .common import load_tensor_file

    if path.endswith(".safetensors"):
        return TrajectoryDataset.load(path)
    data = load_tensor_file(path, "--data")
    if not isinstance(data, (list, tuple)) or not data or not all(isinstance(batch, dict) for batch in data):
        raise ConfigError("--data as a non-empty list of keyword-argument dicts (or a TrajectoryDataset.save file)",
                          f"a {type(data).__name__}", "Save the dataset with TrajectoryDataset.save(path.safetensors).")
    return data


def _example_inputs_from(data, model_spec: str) -> dict:
    """Example inputs for ``transform`` from the training data itself (two recorded rows), for models whose inputs
    cannot be synthesised from their config (text-conditioned ones: record them with ``record --pipeline``)."""
    import torch

    from ..train.trajectories import TEACHER_KEY

    if data is None:
        raise ConfigError(f"example inputs for --model {model_spec}", "none (only class-conditional DiT inputs can "
                          "be synthesised from a config)", "Record the model's inputs through its pipeline with "
                          "`elastic-compile record --pipeline DIR --prompts FILE --out STORE` and pass "
                          "--trajectories STORE (or --data).")
    if isinstance(data, (list, tuple)):
        return data[0]
    rows = torch.arange(min(2, len(data)))
    return {k: v for k, v in data.batch(rows).items() if k != TEACHER_KEY}
