"""``elastic-compile inspect --model ...``: transform a model and print what was found."""
from __future__ import annotations

import dataclasses

from ..config import ElasticConfig
from ..errors import ConfigError
from . import add_json_option, print_json
from .common import parse_floats, resolve_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="transform a model and print its blocks, FFN sites and routers")
    parser.add_argument("--model", required=True, help="package.module:factory or a diffusers model directory")
    parser.add_argument("--inputs", help="example keyword arguments: .safetensors, or a torch.save'd dict of tensors "
                                         "and plain values (optional)")
    parser.add_argument("--buckets", default="0.25,0.5,0.75,1", help="width buckets (default 0.25,0.5,0.75,1)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    import elastic_compile as ec
    model, inputs = resolve_model(args.model, args.inputs)
    if inputs is None:
        raise ConfigError("example inputs for this model", "none", "Pass --inputs FILE (.safetensors, or torch.save of a dict).")
    ec.transform(model, ElasticConfig(width_buckets=parse_floats(args.buckets, "--buckets")), example_inputs=inputs)
    report = ec.report(model)
    if args.json:
        print_json(dataclasses.asdict(report))
    else:
        print(report)
    return 0
