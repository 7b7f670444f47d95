"""``elastic-compile run DIR --classes 0,1,2``: generate images from an exported artifact.

Class-conditional exports run the project's sampler with the scheduler and sampling config stored at export.
Text-conditioned ones run their own diffusers pipeline (``--pipeline PIPE_DIR --prompt ...``): the runtime, built
on the pipeline's transformer as base architecture, becomes ``pipe.transformer`` and the pipeline does the rest
(text encoders, guidance, its cache contexts, decoding)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import BackendUnavailableError, ConfigError
from . import add_json_option, print_json
from .common import parse_ints, require, writable_output


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="generate images from an exported artifact (class labels, or prompts "
                                               "through the model's diffusers pipeline)")
    parser.add_argument("artifact", help="directory written by elastic-compile export")
    parser.add_argument("--classes", default=None, help="class labels, one image each, e.g. 0,1,2")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt, one image each (repeat the flag for more); needs --pipeline")
    parser.add_argument("--pipeline", default=None,
                        help="with --prompt: the diffusers pipeline directory (save_pretrained) whose transformer was "
                             "exported; the runtime takes the transformer's place")
    parser.add_argument("--resolution", default=None,
                        help="with --pipeline: image HEIGHTxWIDTH in pixels, e.g. 1024x768 (default: the pipeline's)")
    parser.add_argument("--call", default="{}",
                        help="with --pipeline: more keyword arguments of the pipeline call, as a JSON object")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the artifact's sampling.json)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded with seed + i")
    parser.add_argument("--cfg", default="batch", choices=("batch", "separate"),
                        help="classifier-free guidance as one batched call per step or two calls")
    parser.add_argument("--out", default="grid.png", help="output .png grid (1 or 3 channels) or .pt tensor")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "torch"),
                        help="what runs the block graphs")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--providers", default=None,
                        help="onnxruntime execution providers in order, e.g. CUDAExecutionProvider,CPUExecutionProvider "
                             "(default: CPUExecutionProvider); with CUDA the graphs take and return GPU tensors")
    parser.add_argument("--thread-pool", default="shared", choices=("shared", "per_session"),
                        help="onnxruntime thread pools: one shared by every block graph (default: this process runs "
                             "nothing else) or one per graph")
    parser.add_argument("--memory-arena", default="shared", choices=("shared", "per_session"),
                        help="onnxruntime CPU memory: one arena for every graph (default: each graph reuses the "
                             "buffers the previous one freed) or one per graph")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch threads for the parts outside the block graphs during a forward (default: 1 "
                             "with onnxruntime, whose spinning threads slow multi-threaded PyTorch ops down; 0: "
                             "leave PyTorch's setting)")
    parser.add_argument("--no-outside-graphs", dest="outside_graphs", action="store_false",
                        help="run the model's ops outside its blocks in PyTorch even where the export has them as "
                             "graphs (outside/; onnxruntime)")
    parser.add_argument("--width", type=float, default=None, help="force every FFN to this width bucket")
    parser.add_argument("--skip", default=None, help="force skips: 'all', 'none' or block indices like 2,5")
    parser.add_argument("--cache", default="auto", choices=("auto", "on", "off"),
                        help="block feature cache: auto = on when the routers were trained cache-aware")
    parser.add_argument("--device", default=None, help="where the PyTorch parts run, e.g. cuda (default: CPU; "
                        "CUDA for TensorRT)")
    parser.add_argument("--model", default=None,
                        help="package.module:factory building the base model's architecture: needed for exports of "
                             "models that are not diffusers models (an artifact's own factory name is never imported)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="torch backend on a GPU: each forward replays one CUDA graph in which the routers "
                        "decide on the GPU (elastic_compile.serve.capture_cuda_graph)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def _torch_threads(value: int | None):
    """``--torch-threads``: absent -> "auto", 0 -> None (PyTorch's own setting), N -> N."""
    if value is None:
        return "auto"
    return None if value == 0 else value


def _providers(args) -> list[str] | None:
    """``--providers``: a comma-separated list, onnxruntime only."""
    if args.providers is None:
        return None
    if args.backend != "onnxruntime":
        raise ConfigError("--providers with --backend onnxruntime", f"--backend {args.backend}",
                          "Leave --providers out, or use --backend onnxruntime.")
    names = [name.strip() for name in args.providers.split(",") if name.strip()]
    if not names:
        raise ConfigError("--providers as names separated by commas", repr(args.providers),
                          "E.g. --providers CUDAExecutionProvider,CPUExecutionProvider.")
    return names


def _skip(text: str | None):
    if text is None:
        return None
    if text in ("all", "none"):
        return text == "all"
    return set(parse_ints(text, "--skip", low=0))


def _check_options(args) -> None:
    """Values argparse's types let through that would fail late or silently (NaN guidance: all-NaN images)."""
    require(args.nrow, "--nrow", 1)
    require(args.steps, "--steps", 1)
    require(args.guidance, "--guidance", 0)
    require(args.threads, "--threads", 1)
    require(args.torch_threads, "--torch-threads", 0)
    require(args.width, "--width", 0, 1)
    if args.device is not None:
        check_device(args.device)


def check_device(name: str) -> None:
    """``--device``: a device name torch knows, and one this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError("--device as a torch device name (cpu, cuda, cuda:1, ...)", repr(name), "Fix the name.") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise BackendUnavailableError(f"a CUDA device for --device {name}", "none on this machine",
                                      "Run on a machine with a GPU, or leave --device out (CPU).")


def save_images(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """(N, C, H, W) in [-1, 1] -> ``.pt`` tensor, or a PNG grid for C in (1, 3)."""
    if path.suffix == ".pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(images.cpu(), path)
        return path
    from ..sampling.images import save_grid
    return save_grid(images, path, nrow)


def sample_with_cuda_graph(runtime, labels: list[int], options: dict) -> torch.Tensor:
    """``runtime.sample`` through a CUDA graph of the sampler's calls (captured first, under the active force)."""
    from ..serve.cuda_graph import capture_for_sampling
    from ..sampling import sample

    if runtime.scheduler is None or runtime.sampling_config is None:
        raise ConfigError("an export with a scheduler and a sampling config", "none stored",
                          "Export with scheduler=... and sampling_config=....")
    dtype = next(runtime.model.parameters()).dtype
    captured = capture_for_sampling(runtime.model, runtime.scheduler, runtime.sampling_config, len(labels),
                                    cfg=options["cfg"], guidance_scale=options["guidance_scale"],
                                    device=runtime.device, dtype=dtype)
    return sample(captured, runtime.scheduler, labels, runtime.sampling_config, device=runtime.device, dtype=dtype,
                  **options)


def run(args) -> int:
    import elastic_compile as ec
    from ..cache import remove_feature_cache, serving_cache_hooks
    from ..stats import StepStats

    if (args.classes is None) == (args.prompt is None):
        raise ConfigError("one of --classes (class-conditional exports) and --prompt (with --pipeline)",
                          "both" if args.classes is not None else "neither",
                          "E.g. --classes 0,1,2, or --pipeline PIPE_DIR --prompt 'a cat'.")
    if args.prompt is not None:
        return run_pipeline(args)
    labels = list(parse_ints(args.classes, "--classes", low=0))
    if args.cuda_graph and args.backend != "torch":
        raise ConfigError("--backend torch with --cuda-graph", f"--backend {args.backend}",
                          "CUDA graphs are captured from the PyTorch model: add --backend torch --device cuda.")
    _check_options(args)
    path = writable_output(args.out, "--out")
    runtime = ec.runtime.load(args.artifact, args.backend, threads=args.threads, device=args.device,
                              thread_pool=args.thread_pool, memory_arena=args.memory_arena,
                              torch_threads=_torch_threads(args.torch_threads), outside_graphs=args.outside_graphs,
                              base_factory=args.model, providers=_providers(args))
    hooks = serving_cache_hooks(runtime, args.cache)
    if args.cache == "off":
        remove_feature_cache(runtime)  # loading turned on the cache the routers were trained for
    steps = StepStats(runtime)  # the whole generation's decisions, not only the last step's
    options = dict(seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance, cfg=args.cfg,
                   progress=True, hooks=hooks, on_step_end=steps)
    started = time.perf_counter()
    with ec.force(runtime, skip=_skip(args.skip), width=args.width):
        images = sample_with_cuda_graph(runtime, labels, options) if args.cuda_graph else \
            runtime.sample(labels, **options)
    seconds = time.perf_counter() - started
    path = save_images(images, path, args.nrow or len(labels))
    driver = runtime.driver
    forwards = None if driver is None else driver.calls + driver.fallbacks - driver.profiled  # stats' FLOP profiling
    outside = "" if driver is None else f"; ops outside the blocks as graphs in {driver.calls} of {forwards} forwards"
    how = args.backend + (", one CUDA graph per forward" if args.cuda_graph else "")
    result = {"images": len(labels), "seconds": seconds, "out": str(path), "backend": args.backend,
              "cuda_graph": args.cuda_graph, "executed_flops_fraction": steps.executed_flops_fraction,
              "skipped_fraction": steps.skipped_fraction,
              "reused_fraction": None if hooks is None else steps.reused_fraction,
              "outside_graph_forwards": None if driver is None else driver.calls, "forwards": forwards}
    runtime.close()
    if args.json:
        print_json(result)
        return 0
    cached = "" if hooks is None else f", {100 * steps.reused_fraction:.1f}% served from the feature cache"
    print(f"{len(labels)} images in {seconds:.2f} s ({how}) -> {path}; the generation executed "
          f"{100 * steps.executed_flops_fraction:.1f}% of dense FLOPs, {100 * steps.skipped_fraction:.1f}% of "
          f"block calls skipped{cached}" + outside)
    return 0


def run_pipeline(args) -> int:
    """``--pipeline DIR --prompt ...``: the export served as the pipeline's transformer."""
    import elastic_compile as ec
    from ..cache import remove_feature_cache
    from ..stats import stats
    from .common import load_pipeline, parse_call, parse_resolution

    if args.pipeline is None:
        raise ConfigError("--pipeline with --prompt", "no --pipeline",
                          "Name the diffusers pipeline directory whose transformer the artifact was exported from.")
    if args.cuda_graph:
        raise ConfigError("--cuda-graph with --classes", "--prompt",
                          "Leave --cuda-graph out: pipelines run through the runtime's per-block dispatch.")
    _check_options(args)
    extra = {**parse_call(args.call), **parse_resolution(args.resolution)}
    path = writable_output(args.out, "--out")
    pipe = load_pipeline(Path(args.pipeline))
    runtime = ec.runtime.load(args.artifact, args.backend, threads=args.threads, device=args.device,
                              thread_pool=args.thread_pool, memory_arena=args.memory_arena,
                              torch_threads=_torch_threads(args.torch_threads), outside_graphs=args.outside_graphs,
                              base_model=pipe.transformer, providers=_providers(args))
    if args.cache == "off":
        remove_feature_cache(runtime)
    elif args.cache == "on":
        ec.apply_feature_cache(runtime.model)
    pipe.transformer = runtime
    per_call = []
    profiling = []

    def keep_stats(module, args_, output):   # stats' own FLOP-profiling forward runs the model too: not counted
        if not profiling:
            profiling.append(True)
            try:
                per_call.append(stats(runtime))
            finally:
                profiling.pop()
    handle = runtime.model.register_forward_hook(keep_stats)
    call = dict(extra, prompt=list(args.prompt), output_type="pt",
                generator=[torch.Generator().manual_seed(args.seed + i) for i in range(len(args.prompt))])
    call.update({name: value for name, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance))
                 if value is not None})
    started = time.perf_counter()
    try:
        with ec.force(runtime, skip=_skip(args.skip), width=args.width):
            images = pipe(**call).images
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    path = save_images(images.float() * 2 - 1, path, args.nrow or len(args.prompt))
    mean = lambda name: sum(getattr(s, name) for s in per_call) / max(1, len(per_call))  # noqa: E731
    result = {"images": len(args.prompt), "seconds": seconds, "out": str(path), "backend": args.backend,
              "pipeline": type(pipe).__name__, "executed_flops_fraction": mean("executed_flops_fraction"),
              "skipped_fraction": mean("skipped_fraction"), "reused_fraction": mean("reused_fraction"),
              "forwards": len(per_call)}
    runtime.close()
    if args.json:
        print_json(result)
        return 0
    print(f"{len(args.prompt)} images in {seconds:.2f} s ({args.backend} through {type(pipe).__name__}) -> {path}; "
          f"the generation executed {100 * result['executed_flops_fraction']:.1f}% of dense FLOPs over "
          f"{len(per_call)} transformer calls, {100 * result['skipped_fraction']:.1f}% of block calls skipped, "
          f"{100 * result['reused_fraction']:.1f}% served from the feature cache")
    return 0
