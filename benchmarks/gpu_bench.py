"""GPU speed of elastic execution: torch eager and per-(block, bucket) CUDA graphs, bf16, DiT-XL/2-shaped blocks.

Run by benchmarks/gpu.sh on one H100/H200 with only PyTorch installed (no diffusers, no TensorRT). For each token
count (256, 1024) and batch (1, 8): a stack of DiT-XL/2-shaped blocks (hidden 1152, 16 heads) made elastic by
``ec.transform``; dense and elastic timed interleaved with CUDA events (medians). Configurations: every FFN at each
bucket, half the blocks skipped, and routers at full capacity (router + gate overhead). "graphs" replaces each
block's forward by a CUDA graph captured per width bucket (static shapes) and each router by a CUDA graph,
replayed by the gate (one device-to-host copy per block carries the decisions): the runtime
pattern the TensorRT backend uses, without TensorRT.

"one graph" captures the whole forward once with ``elastic_compile.runtime.capture_cuda_graph``: routers decide on
the GPU and every block's buckets sit behind CUDA-graph IF nodes (no host round trip). Its dense baseline is the
same model captured as one graph under ``force(skip=False, width=1.0)``. The routed graph is captured once and its
routers' output biases are then set in place, so the same graph is timed with routers that run everything at full
width, that skip every odd block, and that pick each narrower bucket: the decisions, not the capture, change.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elastic_compile as ec  # noqa: E402
from elastic_compile.capture.record import bind_to_signature  # noqa: E402
from elastic_compile.models import DiT, dit_config  # noqa: E402
from elastic_compile.cache import (FeatureCacheConfig, apply_feature_cache, cache_context,  # noqa: E402
                                           remove_feature_cache, reset_cache)
from elastic_compile.nn.gate.device import conditional_nodes_available, device_routing  # noqa: E402
from elastic_compile.state import gate_of, state_of  # noqa: E402


class GraphedBlock:
    """Replays a CUDA graph of one block per width bucket; inputs copied into static buffers."""

    def __init__(self, block, gate, control, buckets, x, c):
        self.gate, self.control, self.eager = gate, control, gate.original_forward
        self.static_x, self.static_c = x.clone(), c.clone()
        self.graphs, self.outputs = {}, {}
        original = gate.original_forward
        for bucket in [None] + list(range(len(buckets) - 1)):
            control.bucket = bucket
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    original(self.static_x, self.static_c)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs[bucket] = original(self.static_x, self.static_c)
            self.graphs[bucket] = graph
        control.bucket = None

    def __call__(self, x, c):
        if x.shape != self.static_x.shape:  # a sub-batch of a mixed plan: no graph for that shape
            return self.eager(x, c)
        self.static_x.copy_(x)
        self.static_c.copy_(c)
        bucket = self.control.bucket
        self.graphs[bucket].replay()
        return self.outputs[bucket]


class GraphedRouter:
    """Replays a CUDA graph of one router (features, MLP, decision logits) captured on static inputs."""

    def __init__(self, router, arguments: dict):
        self.router = router
        self.static = {f.name: arguments[f.name].clone() for f in router.features}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                router.logits(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = router.logits(self.static)

    def logits(self, arguments: dict):
        if any(arguments[name].shape != value.shape for name, value in self.static.items()):
            return self.router.logits(arguments)
        for name, value in self.static.items():
            value.copy_(arguments[name])
        self.graph.replay()
        return self.output

    def __call__(self, arguments: dict):
        logits = self.logits(arguments)
        return logits[:, 0], logits[:, 1:]


def build(tokens: int, depth: int, device, dtype):
    """DiT-XL/2-shaped stack with ``tokens`` tokens, transformed once on the CPU, then moved to the GPU."""
    side = int(tokens ** 0.5) * 2
    torch.manual_seed(0)
    model = DiT(input_size=side, patch_size=2, in_channels=4, num_classes=1000, **dit_config("XL", depth=depth)).eval()
    example = dict(x=torch.randn(1, 4, side, side), t=torch.tensor([500.0]), y=torch.tensor([3]))
    ec.transform(model, example_inputs=example)
    return model.to(device=device, dtype=dtype), side


def make_inputs(side: int, batch: int, device, dtype):
    return dict(x=torch.randn(batch, 4, side, side, device=device, dtype=dtype),
                t=torch.rand(batch, device=device) * 1000, y=torch.randint(0, 1000, (batch,), device=device))


def install_graphs(model, inputs):
    """Capture every block at every bucket on the block inputs of one forward (full batch)."""
    state = state_of(model)
    recorded = {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: recorded.setdefault(i, a)) for i, b in enumerate(state.blocks)]
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        model(**inputs)
    for h in handles:
        h.remove()
    for index, block in enumerate(state.blocks):
        gate = gate_of(block)
        x, c = recorded[index]
        gate.original_forward = GraphedBlock(block, gate, state.controls[index], state.config.width_buckets, x, c)
        if gate.router is not None:
            try:
                gate.router = GraphedRouter(gate.router, bind_to_signature(gate.signature, (x, c), {}))
            except RuntimeError as error:  # keep measuring with the eager router rather than lose the lease
                print(f"block {index}: router not graph-capturable ({error}); it runs eagerly", flush=True)


def remove_graphs(model):
    for block in state_of(model).blocks:
        gate = gate_of(block)
        if isinstance(gate.original_forward, GraphedBlock):
            gate.original_forward = gate.original_forward.eager
        if isinstance(gate.router, GraphedRouter):
            gate.router = gate.router.router
    torch.cuda.empty_cache()


def steer_routers(model, skip: set[int], bucket: int | None, mixed: bool = False) -> None:
    """Routers with zero output weights (full capacity) and biases that skip ``skip`` and pick ``bucket``;
    ``mixed``: random output weights instead (seeded), so samples of a batch disagree."""
    state = state_of(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index, router in state.routers.items():
            router.reset_to_full_capacity()
            if mixed:
                weight = torch.randn(router.fc2.weight.shape, generator=generator) * 3.0
                router.fc2.weight.copy_(weight.to(router.fc2.weight.device, router.fc2.weight.dtype))
                router.fc2.bias.zero_()
                continue
            if index in skip:
                router.fc2.bias[0] = -8.0
            if bucket is not None and router.num_widths > 1:
                router.fc2.bias[1:] = 0.0
                router.fc2.bias[1 + bucket] = 8.0


def one_graph_rows(model, inputs, device, measure, failures: list) -> None:
    """Whole-forward graphs (see the module doc); on the CPU (smoke test) eager device routing stands in."""
    state = state_of(model)
    odd = {s.index for s in state.specs if s.index % 2 == 1 and s.skippable}
    buckets = state.config.width_buckets
    steerings = [("routers, full width", set(), None, False), ("routers skip every odd block", odd, None, False)] + [
        (f"routers pick width {w}", set(), buckets.index(w), False) for w in buckets[:-1][::-1]] + [
        ("random routers (per-sample decisions: the widest chosen bucket runs, masked per sample)", set(), None, True)]
    steer_routers(model, set(), None)
    with torch.no_grad():
        if device.type == "cuda":
            with ec.force(model, skip=False, width=1.0):
                dense_graph = ec.runtime.capture_cuda_graph(model, inputs)
            elastic_graph = ec.runtime.capture_cuda_graph(model, inputs)
            run_dense, run_elastic = (lambda: dense_graph(**inputs)), (lambda: elastic_graph(**inputs))
        else:
            def run_dense():
                with ec.force(model, skip=False, width=1.0):
                    return model(**inputs)

            def run_elastic():
                with device_routing(model, "host"):
                    return model(**inputs)
        for label, skip, bucket, mixed in steerings:
            steer_routers(model, skip, bucket, mixed)
            measure(label, run_dense, run_elastic)
        # the same graph with each block's decision ops compiled into one or two kernels (torch.compile)
        fused_graph = None
        try:
            steer_routers(model, set(), None)
            if device.type == "cuda":
                fused_graph = ec.runtime.capture_cuda_graph(model, inputs, fuse_decisions=True)

            def run_fused():
                if fused_graph is not None:
                    return fused_graph(**inputs)
                with device_routing(model, "host", fuse_decisions=True):
                    return model(**inputs)
            for label, skip in (("routers, full width, fused decisions", set()),
                                ("routers skip every odd block, fused decisions", odd)):
                steer_routers(model, skip, None)
                measure(label, run_dense, run_fused)
        except Exception as error:  # keep the rows above and the cache row below
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"fused decisions failed: {message}", flush=True)
            failures.append(f"one graph with fused decisions (failed: {message})")
        # the feature cache on the device: skipped blocks add their cached residual update (reuse counters,
        # one context, reset before each forward as at the start of a generation)
        steer_routers(model, odd, None)
        apply_feature_cache(model, FeatureCacheConfig(max_reuse=2))
        try:
            with cache_context(model, "bench"):
                cached_graph = ec.runtime.capture_cuda_graph(model, inputs) if device.type == "cuda" else None

            def run_cached():
                reset_cache(model)
                with cache_context(model, "bench"):
                    if cached_graph is not None:
                        return cached_graph(**inputs)
                    with device_routing(model, "host"):
                        return model(**inputs)
            def run_dense_beside_cache():  # the dense graph has no cache ops; eagerly, the cache needs a context
                with cache_context(model, "dense") if cached_graph is None else contextlib.nullcontext():
                    return run_dense()
            measure("routers skip every odd block, feature cache on (its bookkeeping: these skips never find a delta)",
                    run_dense_beside_cache, run_cached)
        finally:
            remove_feature_cache(model)
    steer_routers(model, set(), None)
    if device.type == "cuda":
        del dense_graph, elastic_graph, cached_graph, fused_graph, run_dense, run_elastic
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(fn, repeats: int, device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, perf_counter elsewhere)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def write_results(args, name, rows, started, skipped) -> list[str]:
    """Rewrite the markdown and JSON after every row: a run cut short still leaves what it measured."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "_").replace("/", "_")
    lines = [f"# GPU speed on {name}", "", f"torch {torch.__version__}, bf16, {args.depth} DiT-XL/2-shaped blocks, "
             f"medians of {args.repeats} interleaved runs (CUDA events); total {time.time() - started:.0f} s. "
             "FLOP fraction: executed (ec.stats); where a batch's samples disagree under device routing it is "
             "more than the decisions' own cost (in brackets).", "",
             "| tokens | batch | mode | configuration | FLOP fraction | limit | speedup | efficiency | dense ms | "
             "elastic ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decided = r.get("decided_fraction", r["fraction"])
        shown = f"{r['fraction']:.3f}" + (f" ({decided:.3f})" if abs(decided - r["fraction"]) > 5e-4 else "")
        lines.append(f"| {r['tokens']} | {r['batch']} | {r['mode']} | {r['config']} | {shown} | "
                     f"{r['limit']:.2f}x | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['dense_ms']:.2f} | "
                     f"{r['elastic_ms']:.2f} |")
    (out / f"gpu_{slug}.md").write_text("\n".join(lines) + "\n")
    (out / f"gpu_{slug}.json").write_text(json.dumps(rows, indent=1))
    if skipped:
        lines += ["", f"Not measured (time budget of {args.time_budget:.0f} s spent, or failed as said): "
                  + "; ".join(skipped) + "."]
        (out / f"gpu_{slug}.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--tokens", default="256,1024")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--time-budget", type=float, default=400.0,
                        help="seconds; remaining rows are skipped (and said so) once spent, so the lease is never lost")
    parser.add_argument("--no-one-graph", dest="one_graph", action="store_false",
                        help="leave out the whole-forward graphs with routers deciding on the GPU")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu runs the eager rows only (smoke test)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, bf16, depth {args.depth} DiT-XL/2-shaped blocks", flush=True)
    rows, skipped = [], []
    started = time.time()
    for tokens in (int(t) for t in args.tokens.split(",")):
        model, side = build(tokens, args.depth, device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = make_inputs(side, batch, device, dtype)
            half = {s.index for s in state_of(model).specs if s.index % 2 == 1}
            plans = [("routers, full width", None)] + [(f"every FFN at {w}", dict(skip=False, width=w))
                                                        for w in (0.75, 0.5, 0.25)] + [("half the blocks skipped",
                                                                                         dict(skip=half, width=1.0))]
            # the whole-forward graph first: if the time budget runs out, what goes unmeasured is the older modes
            modes = ["graphs", "eager"] if device.type == "cuda" else ["eager"]
            if args.one_graph and (device.type != "cuda" or conditional_nodes_available()):
                modes.insert(0, "one graph")
            elif args.one_graph:
                print("one graph: skipped, this PyTorch has no conditional CUDA-graph nodes", flush=True)
                skipped.append(f"{tokens} tokens, batch {batch}, one graph (torch {torch.__version__} has no "
                               "conditional CUDA-graph nodes)")
            for mode in modes:
                def measure(label, dense, elastic, mode=mode):
                    if time.time() - started > args.time_budget:
                        skipped.append(f"{tokens} tokens, batch {batch}, {mode}, {label}")
                        return
                    with torch.no_grad():
                        for _ in range(3):
                            dense(), elastic()
                        d, e = [], []
                        for _ in range(args.repeats):
                            d.append(timed(dense, 1, device))
                            e.append(timed(elastic, 1, device))
                        elastic()
                    stats = ec.stats(model)
                    fraction = stats.executed_flops_fraction
                    dm, em = statistics.median(d), statistics.median(e)
                    row = dict(device=name, tokens=tokens, batch=batch, mode=mode, config=label, fraction=fraction,
                               limit=1 / fraction, speedup=dm / em, efficiency=dm / em * fraction, dense_ms=dm,
                               elastic_ms=em, decided_fraction=stats.decided_flops_fraction)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_results(args, name, rows, started, skipped)

                if mode == "one graph":
                    if time.time() - started > args.time_budget:
                        skipped.append(f"{tokens} tokens, batch {batch}, one graph (not captured)")
                        continue
                    try:
                        failures = []
                        one_graph_rows(model, inputs, device, measure, failures)
                        skipped.extend(f"{tokens} tokens, batch {batch}, {f}" for f in failures)
                    except Exception as error:  # report it and keep the other rows: the lease is short
                        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        print(f"one graph failed at {tokens} tokens, batch {batch}: {message}", flush=True)
                        skipped.append(f"{tokens} tokens, batch {batch}, one graph (failed: {message})")
                        steer_routers(model, set(), None)
                    continue
                if mode == "graphs":
                    install_graphs(model, inputs)

                def dense():
                    with ec.force(model, skip=False, width=1.0):
                        return model(**inputs)
                for label, plan in plans:
                    def elastic(plan=plan):
                        if plan is None:
                            return model(**inputs)
                        with ec.force(model, **plan):
                            return model(**inputs)
                    measure(label, dense, elastic)
                if mode == "graphs":
                    remove_graphs(model)
        model = None  # free GPU memory before the next token count
        torch.cuda.empty_cache()
    lines = write_results(args, name, rows, started, skipped)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
