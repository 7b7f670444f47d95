"""Measured speedup of elastic execution against its FLOP-ratio limit (CPU).

    python benchmarks/speed.py                       # torch eager + ONNX Runtime, batch 1 and 4
    python benchmarks/speed.py --backends torch --models DiT-S/2 --batches 1

For every (model, backend, batch, configuration): dense and elastic run interleaved in this process after a
warm-up, >= 10 repetitions each; we report medians, the ratio dense/elastic of each pair, the executed FLOP
fraction (ec.stats), the FLOP-ratio limit 1/fraction and efficiency = measured / limit. "routers, full width" is
the elastic model with untrained routers (they run but keep every block at full width): its slowdown is the
router + gate overhead, reported as a fraction of dense time: the median ratio of back-to-back pairs in alternating
order (45 pairs by default) with a 95% bootstrap interval, across ``--instances`` (3) independently built or loaded
instances of each side where the model's weights exceed the last-level cache (pairs cycle through every dense x elastic combination: instances differ by where their
weights landed in memory, which moved a single-instance comparison by up to 2%; the bootstrap draws instances
too, so the interval includes placement; a model that fits in that cache is timed on one instance a side, as
instances taking turns would evict each other's weights), plus the routers' own time on recorded block inputs
("routers alone": warm, in a loop) and inside real forwards ("in place": right after each block), and "same
instance": the routed elastic model against itself forced dense (routers not consulted), paired the same way: the
routers' cost free of the placement differences between two instances (see the A/A rows). In torch also "on the
same weights": the routed model against a plain copy of the model whose parameters are the elastic model's own
tensors (no toolkit code; gates and routers are the whole difference, memory placement none of it). Dense is what a
user would otherwise deploy in that backend: in torch the plain model (a deep copy, made like the elastic model's:
no toolkit code, so gates, routers and their Python count against elastic); in ONNX Runtime the same model exported
dense only, without router summaries (block graphs end at the block's outputs, run by the same per-block runtime
forced dense; the whole-graph row below says what running block by block costs). In torch, every width row is followed by
a hand-narrowed row: the plain model with its FFN weights physically cut (the bound for that row).
Two control rows per (model, backend, batch): "A/A", ``--instances`` instances of dense against as many other
instances of dense, timed like the router overhead (the machine's noise floor for that comparison); and, in ONNX Runtime, dense through the
per-block runtime against the plain model exported as one ONNX graph (what running block by block costs before
any routing). ONNX Runtime sessions share one thread pool (``--thread-pool shared``, as the CLI deploys) and one
memory arena (the runtime's default; a control row loads the dense export with an arena per graph).
FLOPs: matmuls, convolutions and attention (``analysis.flop_counter``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import elastic_compile as ec
from elastic_compile.capture.treespec import flatten_output
from elastic_compile.analysis.verify import max_abs_difference
from elastic_compile.capture.record import bind_to_signature
from elastic_compile.state import gate_of, state_of
from timing import paired_overhead, timed_speedup  # benchmarks/timing.py

RESULTS = Path(__file__).resolve().parent / "results"
#: Control rows that price one runtime setting against the default (their key holds the paired cost).
SETTING_COSTS = ("threads_cost", "outside_cost", "arena_cost")


FACTORIES = {"DiT-S/2": "elastic_compile.models.dit:dit_s2", "DiT-B/2": "elastic_compile.models.dit:dit_b2"}


def dit(shape: str, batch: int):
    from elastic_compile.artifact.base import call_factory
    torch.manual_seed(0)
    model = call_factory(FACTORIES[f"DiT-{shape}/2"])
    inputs = dict(x=torch.randn(batch, 4, 32, 32), t=torch.rand(batch) * 1000, y=torch.randint(0, 1000, (batch,)))
    return model, inputs


def flux_shaped(batch: int):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                   attention_head_dim=64, num_attention_heads=6, joint_attention_dim=256,
                                   pooled_projection_dim=128, axes_dims_rope=(8, 28, 28)).eval()
    image, text = 1024, 64
    inputs = dict(hidden_states=torch.randn(batch, image, 64), encoder_hidden_states=torch.randn(batch, text, 256),
                  pooled_projections=torch.randn(batch, 128), timestep=torch.rand(batch),
                  img_ids=torch.randn(image, 3), txt_ids=torch.randn(text, 3), return_dict=False)
    return model, inputs


def reference(batch: int):
    from elastic_compile.reference import load_reference
    model, _, config = load_reference()
    inputs = dict(hidden_states=torch.randn(batch, config.in_channels, config.sample_size, config.sample_size),
                  timestep=torch.rand(batch) * 1000, class_labels=torch.randint(0, 10, (batch,)), return_dict=False)
    return model, inputs


MODELS = {"DiT-S/2": lambda b: dit("S", b), "DiT-B/2": lambda b: dit("B", b), "Flux-shaped": flux_shaped,
          "reference": reference}


def configurations(model_name: str, model) -> list[tuple[str, dict | None]]:
    specs = state_of(model).specs
    half = {s.index for s in specs if s.index % 2 == 1 and s.skippable}
    configs = [("routers, full width", None)]
    configs += [(f"every FFN at {w}", dict(skip=False, width=w)) for w in state_of(model).config.width_buckets[:-1]]
    configs.append((f"{len(half)} of {len(specs)} blocks skipped", dict(skip=half, width=1.0)))
    if model_name == "reference":
        configs.append(("trained routers (budget 0.5)", "trained"))
    return configs


def router_seconds(model, inputs, repeats: int = 30) -> float:
    """Median seconds of every router's decision (features, MLP, decision transfer) in one forward, timed alone
    on the block inputs of a real forward: the router's cost without end-to-end timing noise."""
    state = state_of(model)
    recorded = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, k, i=i: recorded.setdefault(i, (a, k)), with_kwargs=True)
             for i, block in enumerate(state.blocks)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    calls = []
    for index, (args, kwargs) in recorded.items():
        gate = gate_of(state.blocks[index])
        arguments = bind_to_signature(gate.signature, args, kwargs)
        calls.append((gate, arguments, gate.stream_batch(arguments)))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            for gate, arguments, batch in calls:
                gate.decide(arguments, batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def _timed_logits(logits, total: list):
    """``logits`` (a router's bound method) adding its seconds to ``total`` (for ``router_seconds_in_place``);
    installed on the router instance, which stays what it is for everything else."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = logits(*args, **kwargs)
        total[0] += time.perf_counter() - start
        return out
    return timed


def router_seconds_in_place(model, inputs, repeats: int = 20) -> float:
    """Median seconds per forward spent inside the routers during real forwards: the same work as
    ``router_seconds`` but where it runs, right after a block (caches full of the block's weights)."""
    routers = [gate_of(block).router for block in state_of(model).blocks
               if gate_of(block).router is not None]
    total = [0.0]
    for router in routers:
        router.logits = _timed_logits(router.logits, total)
    times = []
    try:
        with torch.no_grad():
            for _ in range(repeats + 2):
                total[0] = 0.0
                model(**inputs)
                times.append(total[0])
    finally:
        for router in routers:
            del router.logits
    return statistics.median(times[2:])


def build_dense(model_name: str, base, inputs, backend: str, workdir: Path, thread_pool: str = "shared",
                instances: int = 1):
    """The dense baseline of a backend, as a callable (see the module doc); with ``instances`` > 1, a list of
    independent instances of it (more plain models, or the same export loaded again): the A/A row and the router
    overhead pair across them."""
    if backend == "torch":
        # Copies, like the elastic model: the model as constructed ran up to 8% slower than any deep copy of it
        # (DiT-S/2, batch 1: memory placement), which would have flattered every elastic row.
        models = [copy.deepcopy(base) for _ in range(instances)]
        calls = [lambda m=m: m(**inputs) for m in models]
        return calls if instances > 1 else calls[0]
    out = workdir / f"{model_name.replace('/', '_')}-b{batch_of(inputs)}-dense"
    elastic = ec.transform(copy.deepcopy(base), example_inputs=inputs)
    ec.export(elastic, inputs, out, buckets=[1.0], backend=backend, base_factory=FACTORIES.get(model_name),
              router_summaries=False)
    calls = []
    for _ in range(instances):
        runtime = ec.runtime.load(out, backend=backend, thread_pool=thread_pool, base_factory=FACTORIES.get(model_name))

        def dense(runtime=runtime):
            with ec.force(runtime, skip=False, width=1.0):
                return runtime(**inputs)
        dense.runtime = runtime
        calls.append(dense)
    return calls if instances > 1 else calls[0]


def plain_on_the_same_weights(base, elastic, inputs):
    """A plain copy of ``base`` (no toolkit code runs) whose parameters and buffers are the elastic model's own
    tensors (same storage: ``load_state_dict(assign=True)``; the FFN units in the elastic model's order, which
    computes the same function). Against it the routed model differs by its gates and routers only, not by where
    its weights landed in memory: the router overhead without the placement spread of two instances."""
    plain = copy.deepcopy(base)
    tensors = elastic.state_dict()
    missing, _ = plain.load_state_dict(tensors, strict=False, assign=True)
    owned = {t.data_ptr() for t in tensors.values()}
    separate = [name for name, t in plain.state_dict().items() if t.numel() and t.data_ptr() not in owned]
    if missing or separate:
        raise RuntimeError(f"the plain copy does not hold the elastic model's tensors: missing {missing[:3]}, "
                           f"separate {separate[:3]}")
    with torch.no_grad(), ec.force(elastic, skip=False, width=1.0):
        expected, _ = flatten_output(elastic(**inputs))
        got, _ = flatten_output(plain(**inputs))
    difference = max_abs_difference(expected, got)
    if difference > 1e-4:
        raise RuntimeError(f"the plain copy on the elastic model's weights differs from it forced dense by "
                           f"{difference}")
    return plain


def noise_floor_row(model_name: str, backend: str, inputs, dense_calls, args) -> dict:
    """A/A: instances of dense against as many other instances of dense, timed like the router overhead. Its
    interval is what this machine resolves: instances of the same model differ by memory placement alone."""
    half = len(dense_calls) // 2
    overhead = paired_overhead(dense_calls[:half], dense_calls[half:], pairs=4 * args.repeats)
    what = ("dense against a second instance of dense" if half == 1 else
            f"{half} instances of dense against {half} other instances of dense")
    return control_row(model_name, backend, inputs, f"A/A: {what} (the noise floor)",
                       "noise_floor", overhead)


def control_row(model_name: str, backend: str, inputs, config: str, key: str, overhead: dict) -> dict:
    """A row of two nearly equal dense callables timed by ``paired_overhead``: the ratio of their medians as
    speedup and efficiency, and the paired overhead with its interval under ``key`` / ``<key>_interval``."""
    measured = overhead["base_s"] / overhead["method_s"]
    return {"model": model_name, "backend": backend, "batch": batch_of(inputs), "config": config, "fraction": 1.0,
            "limit": 1.0, "speedup": measured, "efficiency": measured, "dense_ms": overhead["base_s"] * 1e3,
            "elastic_ms": overhead["method_s"] * 1e3, key: overhead["overhead"],
            f"{key}_interval": list(overhead["interval"])}


def whole_graph(model_name: str, base, inputs, threads: int, workdir: Path, shared_pool: bool = True):
    """The plain model exported as one ONNX graph (``torch.onnx.export`` of ``torch.export``), run by one ONNX
    Runtime session with its default options and ``threads`` intra-op threads: how the model is deployed in ONNX
    Runtime without elastic_compile. Returns ``(callable, its output as a tensor)``."""
    import onnxruntime as ort
    path = workdir / f"{model_name.replace('/', '_')}-b{batch_of(inputs)}-whole.onnx"
    with torch.no_grad():
        program = torch.export.export(base.eval(), (), kwargs=inputs)
        torch.onnx.export(program, (), str(path), kwargs=inputs, dynamo=True, external_data=True, verbose=False)
    from elastic_compile.backends.onnxruntime import use_shared_thread_pool
    options = ort.SessionOptions()
    if shared_pool:  # the process-wide pool the runtime uses: the whole graph runs on the same threads
        use_shared_thread_pool(threads)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: inputs[name].numpy() for name in names}
    return (lambda: session.run(None, feed)), torch.from_numpy(session.run(None, feed)[0])


def runtime_vs_whole_graph_row(model_name: str, base, inputs, dense_call, args) -> dict:
    """Dense through the per-block runtime against the whole model as one ONNX graph: what running block by block
    (graph boundaries, PyTorch outside the blocks, the gates' Python) costs before any routing."""
    workdir = Path(args.workdir)
    whole, whole_out = whole_graph(model_name, base, inputs, args.threads, workdir, args.thread_pool == "shared")
    with torch.no_grad():
        runtime_out = dense_call()
    runtime_out = runtime_out[0] if isinstance(runtime_out, (tuple, list)) else runtime_out
    overhead = paired_overhead(whole, dense_call, pairs=2 * args.repeats)
    row = control_row(model_name, "onnxruntime", inputs,
                      "dense through the per-block runtime, against the plain model as one ONNX graph",
                      "dispatch_overhead", overhead)
    return dict(row, max_abs_diff=float((whole_out - runtime_out.float()).abs().max()))


def setting_cost(runtime, inputs, owner, attribute: str, changed, args) -> dict:
    """Paired cost of ``owner.<attribute>`` set to ``changed`` against its value as loaded, on one dense runtime
    instance (a second instance differs by memory placement alone: the A/A row); restored after every call."""
    loaded = getattr(owner, attribute)

    def call(value):
        setattr(owner, attribute, value)
        try:
            with ec.force(runtime, skip=False, width=1.0):
                return runtime(**inputs)
        finally:
            setattr(owner, attribute, loaded)
    return paired_overhead(lambda: call(loaded), lambda: call(changed), pairs=4 * args.repeats)


def torch_threads_row(model_name: str, inputs, dense_call, args) -> dict:
    """The dense runtime as loaded by default (its PyTorch parts on one thread while a forward runs, see
    ``elastic_compile.serve.torch_threads``) against itself with ``torch_threads`` None (PyTorch at
    ``--threads`` between the block graphs): what that default is worth."""
    runtime = dense_call.runtime
    overhead = setting_cost(runtime, inputs, runtime, "torch_threads", None, args)
    return control_row(model_name, "onnxruntime", inputs,
                       f"dense runtime with PyTorch at {args.threads} threads between the block graphs "
                       "(torch_threads=None), against itself with the default (1 thread)", "threads_cost", overhead)


def outside_graphs_row(model_name: str, inputs, dense_call, args) -> dict:
    """The dense runtime as loaded by default (the model's ops outside its blocks run as the export's
    ``outside/`` graphs, see ``elastic_compile.serve.driver``) against itself with its driver disabled (those
    ops in PyTorch, the model's Python forward): what the graphs are worth."""
    runtime = dense_call.runtime
    if runtime.driver is None:
        raise RuntimeError(f"{model_name}: the dense export has no outside graphs ({runtime.manifest.get('program_note')})")
    overhead = setting_cost(runtime, inputs, runtime.driver, "enabled", False, args)
    return control_row(model_name, "onnxruntime", inputs,
                       "dense runtime with the ops outside the blocks in PyTorch (its driver disabled), against "
                       "itself as loaded (those ops as the exported graphs)", "outside_cost", overhead)


def memory_arena_row(model_name: str, inputs, dense_call, args) -> dict:
    """The dense runtime as loaded by default (every graph's memory from the process's one shared arena, see
    ``elastic_compile.backends.onnxruntime``) against the same export loaded with an arena per graph
    (``memory_arena="per_session"``): what the shared arena is worth. Two instances (an arena cannot be swapped
    under a loaded session), so the A/A row's placement floor is in it."""
    runtime = ec.runtime.load(dense_call.runtime.root, backend="onnxruntime", thread_pool=args.thread_pool,
                              memory_arena="per_session", base_factory=FACTORIES.get(model_name))

    def per_session():
        with ec.force(runtime, skip=False, width=1.0):
            return runtime(**inputs)
    per_session()  # its sessions open on the first call, before anything is timed
    settle_heap()
    overhead = paired_overhead(dense_call, per_session, pairs=4 * args.repeats)
    return control_row(model_name, "onnxruntime", inputs,
                       "dense runtime with a memory arena per graph (memory_arena='per_session'), against the "
                       "default shared arena (a second instance: read with the A/A row)", "arena_cost", overhead)


def settle_heap() -> None:
    """Collect the exports' garbage and give the freed heap back to the OS before anything is timed. Without
    this, the sessions created first (the dense baseline's, at its first call) were placed in memory the
    exports had just freed and ran 4-6% slower than a second instance of the same export (DiT-B/2, batch 1,
    paired A/A; -2 to -3% with it)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def batch_of(inputs) -> int:
    return next(iter(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)))


def last_level_cache_bytes() -> int:
    """This host's largest CPU cache (Linux sysfs); 32 MiB where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


def instances_for(base, wanted: int) -> int:
    """``wanted`` instances per side where the model's weights stream from memory every forward (placement then
    moves timings and is worth averaging out), one where they fit in the last-level cache: instances taking
    turns there would evict each other's weights, which a deployment running one instance never sees."""
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    return wanted if weights > last_level_cache_bytes() else 1


def build_elastic(model_name: str, base, inputs, backend: str, workdir: Path, routers_in: str | None = None,
                  thread_pool: str = "shared", load_only: bool = False):
    """(elastic callable, the object ec.force/ec.stats act on) for a backend; ``load_only``: load the export
    that an earlier call wrote again (another instance of the same runtime)."""
    out = workdir / f"{model_name.replace('/', '_')}-b{batch_of(inputs)}"
    if load_only:
        return ec.runtime.load(out, backend=backend, routers=routers_in, thread_pool=thread_pool,
                               base_factory=FACTORIES.get(model_name))
    elastic = copy.deepcopy(base)
    if model_name == "reference":
        from elastic_compile.reference import ASSETS_DIR
        routers = ASSETS_DIR / "routers"
        if (routers / "elastic.json").is_file():
            ec.load(elastic, routers)
        else:
            ec.transform(elastic, example_inputs=inputs)
    else:
        ec.transform(elastic, example_inputs=inputs)
    if backend == "torch":
        return elastic
    ec.export(elastic, inputs, out, backend=backend, base_factory=FACTORIES.get(model_name))
    return ec.runtime.load(out, backend=backend, routers=routers_in, thread_pool=thread_pool,
                           base_factory=FACTORIES.get(model_name))


def host_cpu() -> str:
    """The CPU's model name and core count (rows of runs on other hosts are not comparable)."""
    import os
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def run(args) -> list[dict]:
    rows = []
    cpu, date = host_cpu(), time.strftime("%Y-%m-%d %H:%M")
    workdir = Path(args.workdir)
    for model_name in args.models:
        for batch in args.batches:
            base, inputs = MODELS[model_name](batch)
            for backend in args.backends:
                elastic = build_elastic(model_name, base, inputs, backend, workdir, args.runtime_routers,
                                        args.thread_pool)
                trained = state_of(elastic).routers and model_name == "reference"
                instances = instances_for(base, args.instances)
                dense_calls = build_dense(model_name, base, inputs, backend, workdir, args.thread_pool,
                                          instances=2 * instances)
                # more elastic instances for the router overhead (the same export loaded again, in ONNX Runtime)
                others = [build_elastic(model_name, base, inputs, backend, workdir, args.runtime_routers,
                                        args.thread_pool, load_only=backend != "torch")
                          for _ in range(instances - 1)]
                settle_heap()
                dense_call = dense_calls[0]
                rows.append(noise_floor_row(model_name, backend, inputs, dense_calls, args))
                print(json.dumps(rows[-1]), flush=True)
                for label, plan in configurations(model_name, elastic):
                    if plan == "trained" and not trained:
                        continue
                    routers = state_of(elastic).routers.values()
                    saved = [copy.deepcopy(r.state_dict()) for r in routers]
                    if plan is None:  # overhead: routers at full capacity run, every block stays full width
                        for router in [r for m in [elastic] + others for r in state_of(m).routers.values()]:
                            router.reset_to_full_capacity()

                    def elastic_call(plan=plan):
                        if isinstance(plan, dict):
                            with ec.force(elastic, **plan):
                                return elastic(**inputs)
                        return elastic(**inputs)
                    if plan is None:  # two nearly equal times: back-to-back pairs, ABBA order, 4x the repetitions
                        overhead = paired_overhead(dense_calls[:instances],
                                                   [elastic_call] + [lambda m=m: m(**inputs) for m in others],
                                                   pairs=4 * args.repeats)
                        dense_s, elastic_s = overhead["base_s"], overhead["method_s"]
                    else:
                        dense_s, elastic_s, _ = timed_speedup(dense_call, elastic_call, args.repeats, warmup=2)
                    with torch.no_grad():
                        elastic_call()
                    fraction = ec.stats(elastic).executed_flops_fraction
                    measured = dense_s / elastic_s
                    row = dict(model=model_name, backend=backend, batch=batch, config=label, fraction=fraction,
                               limit=1 / fraction, speedup=measured, efficiency=measured * fraction,
                               dense_ms=dense_s * 1e3, elastic_ms=elastic_s * 1e3)
                    if plan is None:
                        if backend != "torch":
                            row["routers"] = next(type(gate_of(b).router).__name__ for b in state_of(elastic).blocks
                                                  if gate_of(b).router is not None)
                        row["router_overhead"] = overhead["overhead"]
                        row["router_overhead_interval"] = list(overhead["interval"])
                        row["router_overhead_instances"] = instances
                        row["router_share"] = router_seconds(elastic, inputs) / dense_s
                        row["router_share_in_place"] = router_seconds_in_place(elastic, inputs) / dense_s

                        def forced_dense():  # the same instance, routers not consulted (gates and graphs as is)
                            with ec.force(elastic, skip=False, width=1.0):
                                return elastic(**inputs)
                        same = paired_overhead(forced_dense, elastic_call, pairs=4 * args.repeats)
                        row["router_overhead_same_instance"] = same["overhead"]
                        row["router_overhead_same_instance_interval"] = list(same["interval"])
                        if backend == "torch":  # gates and routers against no toolkit code, same tensors
                            plain = plain_on_the_same_weights(base, elastic, inputs)
                            shared = paired_overhead(lambda: plain(**inputs), elastic_call, pairs=4 * args.repeats)
                            row["router_overhead_same_weights"] = shared["overhead"]
                            row["router_overhead_same_weights_interval"] = list(shared["interval"])
                            del plain
                        others, dense_calls = [], dense_calls[:1]  # the extra instances are done with
                        settle_heap()
                    for router, state in zip(routers, saved):
                        router.load_state_dict(state)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if backend == "torch" and isinstance(plan, dict) and plan["skip"] is False:
                        rows.append(hand_narrowed_row(row, base, elastic, inputs, plan["width"], args.repeats,
                                                      dense_call))
                        print(json.dumps(rows[-1]), flush=True)
                if backend == "onnxruntime":
                    rows.append(outside_graphs_row(model_name, inputs, dense_call, args))
                    print(json.dumps(rows[-1]), flush=True)
                    rows.append(torch_threads_row(model_name, inputs, dense_call, args))
                    print(json.dumps(rows[-1]), flush=True)
                    rows.append(memory_arena_row(model_name, inputs, dense_call, args))
                    print(json.dumps(rows[-1]), flush=True)
                if backend == "onnxruntime" and args.whole_graph:
                    try:
                        rows.append(runtime_vs_whole_graph_row(model_name, base, inputs, dense_call, args))
                    except Exception as exc:  # a model torch.onnx cannot export whole: say so in the results
                        rows.append(dict(model=model_name, backend=backend, batch=batch, fraction=1.0, limit=1.0,
                                         config=f"plain model as one ONNX graph: not measured ({type(exc).__name__}: "
                                                f"{str(exc).splitlines()[0][:120]})",
                                         speedup=float("nan"), efficiency=float("nan"), dense_ms=float("nan"),
                                         elastic_ms=float("nan"), dispatch_overhead=None))
                    print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row.update(cpu=cpu, measured=date)
    return rows


def hand_narrowed(base, elastic, width: float):
    """A plain copy of ``base`` (no toolkit code runs) whose FFN projections are physically cut to ``width``
    along the analysis' slices: what a model built that narrow costs, i.e. the bound for the width rows (the
    ONNX Runtime width rows already run such graphs)."""
    model = copy.deepcopy(base)
    for spec in state_of(elastic).specs:
        for site in spec.sites:
            for cut in site.all_slices():
                module = model.get_submodule(".".join(p for p in (spec.path, cut.module) if p))
                index = torch.tensor(cut.indices(site.units_at(width)))
                value = getattr(module, cut.attribute).detach().index_select(cut.dim, index).contiguous()
                setattr(module, cut.attribute, torch.nn.Parameter(value, requires_grad=False))
    return model.eval()


def hand_narrowed_row(elastic_row: dict, base, elastic, inputs, width: float, repeats: int, dense_call) -> dict:
    narrowed = hand_narrowed(base, elastic, width)
    dense_s, narrow_s, measured = timed_speedup(dense_call, lambda: narrowed(**inputs), repeats, warmup=2)
    fraction = elastic_row["fraction"]
    return dict(elastic_row, config=f"hand-narrowed FFN at {width} (plain PyTorch model, the bound for the row above)",
                speedup=measured, efficiency=measured * fraction, dense_ms=dense_s * 1e3, elastic_ms=narrow_s * 1e3)


def write(rows, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Speed: measured speedup vs the FLOP-ratio limit (CPU)", "",
             f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
             f"{args.threads} threads (torch.set_num_threads), {args.repeats} interleaved repetitions after warm-up, "
             "medians. Dense = what a user would deploy without elastic_compile in that backend: the plain PyTorch "
             "model (torch; a deep copy, made like the elastic model's); the model exported dense only, without router summaries, run by the same runtime "
             f"(onnxruntime, thread pool: {args.thread_pool}; the ops outside the blocks as exported graphs where the "
             "model has them, PyTorch between the graphs on 1 thread: the runtime's defaults). Router overhead and A/A "
             f"pair across {args.instances} independent instances of each side (every combination; the interval "
             "draws instances too) where the model's weights exceed the last-level cache, one instance a side where "
             "they fit; in torch also against a plain copy of the model holding the elastic model's own tensors (gates "
             "and routers the whole difference, memory placement none of it). Control rows: A/A (dense against other instances of dense: the noise floor) and, in ONNX Runtime, the per-block runtime against the whole model as "
             "one ONNX graph, against itself with the ops outside the blocks in PyTorch instead of their exported "
             "graphs, against itself with PyTorch's threads left as they are, and against a second instance with a "
             "memory arena per graph."
             + (" Merged: rows of other models/backends are from the previous results file." if args.merge else "")
             + f" This run's host: {host_cpu()}" + (" (each row's host and date are in speed.json; rows without "
                                                    "them predate that record)." if args.merge else "."),
             "",
             "| model | backend | batch | configuration | FLOP fraction | limit | speedup | efficiency | "
             "dense ms | elastic ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = ""
        if "router_overhead" in r:
            alone = f", routers alone {100 * r['router_share']:.1f}%" if "router_share" in r else ""
            if "router_share_in_place" in r:
                alone += f", in place {100 * r['router_share_in_place']:.1f}%"
            interval = (" [{:+.1f}, {:+.1f}]".format(*(100 * v for v in r["router_overhead_interval"]))
                        if "router_overhead_interval" in r else "")
            runs = f", {r['routers']}" if "routers" in r else ""
            same = (", same instance {:+.1f}% [{:+.1f}, {:+.1f}]".format(
                100 * r["router_overhead_same_instance"], *(100 * v for v in r["router_overhead_same_instance_interval"]))
                if "router_overhead_same_instance" in r else "")
            if "router_overhead_same_weights" in r:
                same = (", against the plain model on the same weights {:+.1f}% [{:+.1f}, {:+.1f}]".format(
                    100 * r["router_overhead_same_weights"], *(100 * v for v in r["router_overhead_same_weights_interval"]))
                    + same)
            across = (f" across {r['router_overhead_instances']}x{r['router_overhead_instances']} instances"
                      if r.get("router_overhead_instances", 1) > 1 else "")
            extra = (f" (router overhead {100 * r['router_overhead']:+.1f}%{interval} end to end{across}{same}{alone}"
                     f"{runs})")
        if r.get("noise_floor") is not None:
            extra = " ({:+.1f}% [{:+.1f}, {:+.1f}])".format(
                100 * r["noise_floor"], *(100 * v for v in r["noise_floor_interval"]))
        for key in SETTING_COSTS:
            if r.get(key) is not None:
                extra = " (cost {:+.1f}% [{:+.1f}, {:+.1f}])".format(100 * r[key], *(100 * v for v in r[f"{key}_interval"]))
        if r.get("dispatch_overhead") is not None:
            extra = (" (runtime cost {:+.1f}% [{:+.1f}, {:+.1f}]; outputs differ by {:.1e})".format(
                100 * r["dispatch_overhead"], *(100 * v for v in r["dispatch_overhead_interval"]), r["max_abs_diff"]))
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['config']}{extra} | {r['fraction']:.3f} | "
                     f"{r['limit']:.2f}x | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['dense_ms']:.1f} | "
                     f"{r['elastic_ms']:.1f} |")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 5))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        points = [r for r in rows if r["backend"] == backend and "router_overhead" not in r
                  and "dispatch_overhead" not in r and "noise_floor" not in r
                  and not any(key in r for key in SETTING_COSTS) and not r["config"].startswith("hand-narrowed")]
        ax.scatter([r["limit"] for r in points], [r["speedup"] for r in points], label=backend)
    bounds = [r for r in rows if r["config"].startswith("hand-narrowed")]
    if bounds:
        ax.scatter([r["limit"] for r in bounds], [r["speedup"] for r in bounds], marker="x", color="k",
                   label="hand-narrowed plain model (torch)")
    top = max([r["limit"] for r in rows] + [2.0])
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="FLOP-ratio limit")
    ax.set_xlabel("FLOP-ratio limit (1 / executed fraction)")
    ax.set_ylabel("measured speedup")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "speed.png", dpi=110)
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiT-S/2,DiT-B/2,Flux-shaped,reference")
    parser.add_argument("--out", default=str(RESULTS), help="directory for speed.md / speed.json / speed.png")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the measured (model, backend) rows of results/speed.json")
    parser.add_argument("--runtime-routers", default=None, choices=("host", "torch", "onnx"),
                        help="how an exported runtime runs its routers (ec.runtime.load(routers=...); default: "
                             "the runtime's, 'host' for onnxruntime)")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--instances", type=int, default=3,
                        help="independent instances of dense and of elastic that the router overhead (and of dense "
                             "that the A/A row) pair across: placement in memory averaged out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/elastic-speed")
    parser.add_argument("--thread-pool", default="shared", choices=("shared", "per_session"),
                        help="ONNX Runtime thread pools (ec.runtime.load(thread_pool=...)); 'shared' is what the CLI "
                             "deploys")
    parser.add_argument("--no-whole-graph", dest="whole_graph", action="store_false",
                        help="skip the ONNX Runtime row that compares the per-block runtime with the plain model "
                             "exported as one graph")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    args.backends = args.backends.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    rows = run(args)
    if args.merge and (Path(args.out) / "speed.json").is_file():  # replace these (model, backend) rows, keep the others
        measured = {(r["model"], r["backend"]) for r in rows}
        previous = json.loads((Path(args.out) / "speed.json").read_text())
        kept = [r for r in previous if (r["model"], r["backend"]) not in measured]
        order = list(dict.fromkeys(r["model"] for r in previous + rows))
        backends = ["torch", "onnxruntime"]
        rows = sorted(kept + rows, key=lambda r: (order.index(r["model"]), r["batch"], backends.index(r["backend"])))
    write(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
