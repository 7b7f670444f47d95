"""``elastic-compile export --model ... --out DIR``: export an elastic model to static-shape ONNX graphs."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ElasticConfig
from ..errors import ConfigError
from . import add_json_option, print_json
from .common import load_scheduler, parse_floats, parse_ints, require, resolve_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export an elastic model (per block and width bucket ONNX graphs)")
    parser.add_argument("--model", required=True, help="package.module:factory or a diffusers model directory")
    parser.add_argument("--inputs", help="example keyword arguments (fix the static shapes): a .safetensors file, or a "
                                         "torch.save'd dict of tensors and plain values (read with weights_only=True)")
    parser.add_argument("--routers", help="an elastic_compile.save artifact to load onto the model (default: "
                                          "transform it, untrained routers)")
    parser.add_argument("--out", required=True, help="output directory (a previous export there is replaced atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is a non-empty directory that is not a previous export "
                             "(deletes what it holds)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                        help="backend the export is prepared and verified for")
    parser.add_argument("--buckets", default=None, help="width buckets to export, e.g. 0.25,0.5,0.75,1 (default: all)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="dtype of the exported graphs")
    parser.add_argument("--batch-sizes", default=None, help="static batch sizes, e.g. 1,2 (default: 1 and the "
                                                            "example batch)")
    parser.add_argument("--scheduler", help="diffusers scheduler folder to ship with the export (default: "
                                            "<model dir>/../scheduler when present)")
    parser.add_argument("--sampling", help="sampling.json to ship (default: <model dir>/../sampling.json when present)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads used for verification")
    parser.add_argument("--trt-optimization-level", type=int, default=3, help="TensorRT builder optimization level")
    parser.add_argument("--no-verify-runtime", action="store_true", help="skip the whole-model check of the result")
    parser.add_argument("--no-outside-graphs", dest="outside_graphs", action="store_false",
                        help="do not export the model's ops outside its blocks as graphs (they then run in PyTorch)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def _sampling_assets(args):
    from ..sampling import SamplingConfig

    model_dir = Path(args.model)
    scheduler_dir = Path(args.scheduler) if args.scheduler else model_dir.parent / "scheduler"
    sampling_file = Path(args.sampling) if args.sampling else model_dir.parent / "sampling.json"
    scheduler = config = None
    if (scheduler_dir / "scheduler_config.json").is_file() and (args.scheduler or model_dir.is_dir()):
        scheduler = load_scheduler(scheduler_dir)
    if sampling_file.is_file() and (args.sampling or model_dir.is_dir()):
        config = SamplingConfig.load(sampling_file)
    return scheduler, config


def run(args) -> int:
    import elastic_compile as ec

    require(args.threads, "--threads", 1)
    require(args.trt_optimization_level, "--trt-optimization-level", 0, 5)
    batch_sizes = list(parse_ints(args.batch_sizes, "--batch-sizes", low=1)) if args.batch_sizes else None
    model, inputs = resolve_model(args.model, args.inputs)
    if inputs is None:
        raise ConfigError("example inputs for this model", "none",
                          "Pass --inputs FILE (a .safetensors file, or torch.save of a dict of keyword arguments).")
    buckets = parse_floats(args.buckets, "--buckets") if args.buckets else None
    if args.routers:
        ec.load(model, args.routers)
    else:
        config = ElasticConfig(width_buckets=buckets) if buckets else ElasticConfig()
        ec.transform(model, config, example_inputs=inputs)
    factory = args.model if ":" in args.model and not Path(args.model).exists() else None
    scheduler, sampling = _sampling_assets(args)
    out = ec.export(model, inputs, args.out, buckets=buckets, dtype=args.dtype, backend=args.backend,
                    batch_sizes=batch_sizes, base_factory=factory, scheduler=scheduler, sampling_config=sampling,
                    threads=args.threads, verify_runtime=not args.no_verify_runtime, progress=True,
                    trt_options={"optimization_level": args.trt_optimization_level},
                    outside_graphs=args.outside_graphs, overwrite=args.overwrite)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    program = manifest.get("program")
    if args.json:
        print_json({"out": str(out), "blocks": len(manifest["blocks"]), "buckets": manifest["buckets"],
                    "batch_sizes": manifest["batch_sizes"], "dtype": manifest["dtype"],
                    "export_seconds": manifest["export_seconds"],
                    "max_abs_diff": manifest["verification"]["max_abs_diff"],
                    "outside_graphs": sum("graph" in s for s in program["steps"]) if program else 0})
        return 0
    print(f"exported {len(manifest['blocks'])} blocks x buckets {manifest['buckets']} x batch sizes "
          f"{manifest['batch_sizes']} ({manifest['dtype']}) to {out} in {manifest['export_seconds']} s; "
          f"max |diff| vs PyTorch {manifest['verification']['max_abs_diff']:.3g}")
    print(f"outside the blocks: {sum('graph' in s for s in program['steps'])} graphs (outside/), batch "
          f"{'dynamic' if program.get('batch', {}).get('dynamic') else 'static'}" if program
          else f"outside the blocks: PyTorch ({manifest.get('program_note')})")
    return 0
