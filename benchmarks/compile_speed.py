"""torch.compile of routed inference vs eager routing, on the bundled reference model (its trained routers).

Rows, each timed in interleaved pairs against eager host routing (the default path): eager dense (no routing
benefit), and ``torch.compile(fullgraph=True, backend="inductor")`` under ``device_routing(model, MODE)``. Prints
per row the median seconds per forward and the median of per-pair ratios (compiled / eager routed), and checks
that the compiled output equals the eager one. The reference model is a diffusers ``DiTTransformer2DModel``,
whose attention Dynamo cannot trace inside ``torch.cond`` (torch 2.13), so MODE is "compile_select" there (every
block runs; rows are selected). The routers were trained cache-aware; both sides here run them without the
feature cache (compiled routing has none), so the decisions are the trained ones but samples are not the
trained quality: a speed comparison only.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/compile_speed.py [--batch 2] [--pairs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import elastic_compile as ec
from elastic_compile.nn.gate.device import device_routing
from elastic_compile.reference import ASSETS_DIR, load_reference


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--mode", default="compile_select", choices=("compile", "compile_select"))
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, config = load_reference()
    inputs = dict(hidden_states=torch.randn(args.batch, config.in_channels, config.sample_size, config.sample_size),
                  timestep=torch.rand(args.batch) * 1000, class_labels=torch.randint(0, 10, (args.batch,)),
                  return_dict=False)
    ec.load(model, ASSETS_DIR / "routers", cache="off")  # compiled routing has no feature cache
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)

    def eager_routed():
        return model(**inputs)[0]

    def eager_dense():
        with ec.force(model, skip=False, width=1.0):
            return model(**inputs)[0]

    def compiled_routed():
        with device_routing(model, args.mode):
            return compiled(**inputs)[0]

    with torch.no_grad():
        start = time.perf_counter()
        out = compiled_routed()
        print(f"first compiled call (compilation): {time.perf_counter() - start:.1f} s")
        reference = eager_routed()
        print(f"compiled vs eager routed, max abs difference: {(out - reference).abs().max().item():.2e}")
        print(f"eager routing executed FLOPs fraction: {ec.stats(model).executed_flops_fraction:.3f}")
        for label, call in (("eager dense", eager_dense), (f"compiled ({args.backend}, {args.mode})", compiled_routed)):
            for _ in range(3):
                call(), eager_routed()
            base, other, ratios = [], [], []
            for i in range(args.pairs):
                pair = (eager_routed, call) if i % 2 == 0 else (call, eager_routed)
                seconds = {fn: timed(fn) for fn in pair}
                base.append(seconds[eager_routed])
                other.append(seconds[call])
                ratios.append(seconds[call] / seconds[eager_routed])
            print(f"{label}: median {statistics.median(other) * 1e3:.2f} ms vs eager routed "
                  f"{statistics.median(base) * 1e3:.2f} ms; median ratio {statistics.median(ratios):.3f} "
                  f"({args.pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
