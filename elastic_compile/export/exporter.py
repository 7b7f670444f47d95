"""``export(model, example_inputs, out_dir, ...)``: static-shape ONNX graphs of an elastic model's blocks.

Layout of an export directory::

    manifest.json              written last: format, source fingerprint, shapes, buckets, batch sizes, files+sha256
    base/                      the base model (diffusers folder, or safetensors + factory.json), see artifact/base.py
    elastic/                   elastic_compile.save artifact (config, block specs, permutations, routers)
    blocks/<i>/weights.bin     block i's weights, once (external data shared by all of its graphs)
    blocks/<i>/bucket<k>_b<n>.onnx   block i at width bucket k for batch size n (static shapes); outputs: the
                               block's tensor outputs, then the router summaries of its "pooled_outputs"
                               (layer-normalised token means, eps "summary_eps": export.program.token_summary),
                               then, with a "lookahead" entry, the next block's router logits (export.lookahead)
    routers/router_<i>.onnx    router of block i (dynamic batch)
    outside/part_<k>.onnx      the model's ops between two block calls (embeddings, final layer...), for the
                               example call's shapes; the manifest's "program" lists them with the block calls
                               (fp32 onnxruntime exports, where the forward captures with its blocks opaque:
                               see .outside; else "program" is null and "program_note" says why)
    scheduler/, sampling.json  optional: how to sample the model (diffusers scheduler config, SamplingConfig)
    engines/                   optional: TensorRT engine cache (built when TensorRT is present at export)

What runs where: block graphs run in ONNX Runtime / TensorRT; everything outside the blocks (embeddings,
patchify, final norm/projection) runs as the ``outside/`` graphs in ONNX Runtime for calls shaped like the
example (at any batch size where the batch dimension could be made dynamic), else in PyTorch (the runtime rebuilds the base model from ``base/`` and installs ``elastic/``), the routers in NumPy on the host with ONNX Runtime (or, when the previous block's graph
computed them, not at all: see :mod:`.lookahead`) and in PyTorch with TensorRT.
Sub-batches of samples that share a plan are padded up to the nearest exported batch size (rows repeated;
samples never interact inside a block, so padding rows cannot change real rows) or split into chunks of the
largest size.
"""
from __future__ import annotations

import datetime
import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..artifact import manifest as mf
from ..artifact.base import is_diffusers_model, save_base
from ..artifact.commit import staging_directory
from ..artifact.graphs import DTYPES
from ..artifact.layout import dtype_name
from ..artifact.tolerance import ATOL, max_abs_diff, within
from ..backends.tensorrt import prebuild_engines
from ..capture.record import bind_to_signature
from ..errors import ConfigError, ExportError
from ..serialization import save as save_elastic
from ..state import gate_of, state_of
from .onnx_io import OPSET, WeightFile, block_tensors, check_file, export_graph, write_block_graph
from .outside import export_outside
from .program import SUMMARY_EPS, BlockProgram, RouterProgram, cast_inputs, cast_module
from .recording import RecordedCall, attach_lookaheads, record_block_calls
from .verify import ORT_CPU_DTYPES, compare_block_file, run_ort

logger = logging.getLogger("elastic_compile")
BACKENDS = ("onnxruntime", "tensorrt")


def _validate(model, state, buckets, dtype: str, backend: str, batch_sizes, example_batch: int, base_factory):
    if dtype not in DTYPES:
        raise ConfigError(f"dtype in {sorted(DTYPES)}", repr(dtype), "Use fp32, fp16 or bf16.")
    if backend not in BACKENDS:
        raise ConfigError(f"backend in {BACKENDS}", repr(backend), "Use onnxruntime or tensorrt.")
    if backend == "onnxruntime" and dtype not in ORT_CPU_DTYPES:
        raise ConfigError(f"a dtype onnxruntime CPU can run ({', '.join(ORT_CPU_DTYPES)})", dtype,
                          "Export bf16 for backend='tensorrt', or use fp16/fp32 for onnxruntime.")
    widths = state.config.width_buckets if buckets is None else tuple(float(b) for b in buckets)
    indices = sorted({state.bucket_index(w) for w in widths} | {state.dense_bucket})
    sizes = sorted({1, example_batch} if batch_sizes is None else {int(n) for n in batch_sizes})
    if not is_diffusers_model(model) and not base_factory:
        raise ConfigError("base_factory='package.module:factory' for a model that is not a diffusers ModelMixin",
                          f"a {type(model).__name__} and no factory",
                          "Pass base_factory: a function that builds the architecture (its weights are replaced).")
    if not sizes or sizes[0] < 1:
        raise ConfigError("batch sizes >= 1", f"{sizes}", "E.g. batch_sizes=(1, 2).")
    return indices, sizes


def _groups(state, calls: list[RecordedCall]) -> dict:
    """Blocks that one template graph can serve: same analysis group, sites and call layout."""
    groups: dict[tuple, list[RecordedCall]] = OrderedDict()
    for spec, call in zip(state.specs, calls):
        lookahead = call.lookahead.signature() if call.lookahead is not None else None
        groups.setdefault((spec.group, repr(spec.sites), call.layout.signature(), call.outputs.spec, lookahead),
                          []).append(call)
    return groups


def _runs_in_torch(model: nn.Module, state) -> list[str]:
    paths = [spec.path for spec in state.specs]
    return [name for name, _ in model.named_children()
            if not any(p == name or p.startswith(name + ".") for p in paths)]


def _describe(inputs: Any):
    return pytree.tree_map(lambda x: {"shape": list(x.shape), "dtype": dtype_name(x.dtype)}
                           if isinstance(x, torch.Tensor) else (x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)),
                           inputs)


class _Exporter:
    def __init__(self, model, example_inputs, root: Path, indices, sizes, dtype, threads, progress):
        self.model, self.example, self.root = model, example_inputs, root
        self.state = state_of(model)
        self.indices, self.sizes, self.dtype = indices, sizes, dtype
        self.torch_dtype = DTYPES[dtype]
        self.threads = threads
        self.verify_ort = dtype in ORT_CPU_DTYPES
        self.progress = progress
        self.worst = 0.0

    def block_graphs(self, calls: list[RecordedCall]) -> list[dict]:
        state, dense = self.state, self.state.dense_bucket
        entries = {call.index: {"index": call.index, "path": state.specs[call.index].path,
                                "layout": call.layout.to_dict(), "outputs": call.outputs.to_dict(),
                                "weights": f"blocks/{call.index:03d}/weights.bin", "graphs": {},
                                "complex_inputs": [], "max_abs_diff": 0.0, "pooled_outputs": call.pooled,
                                "summary_eps": SUMMARY_EPS}
                   for call in calls}
        for call in calls:
            if call.lookahead is not None:
                entries[call.index]["lookahead"] = {"block": call.lookahead.block,
                                                    "sources": [list(s) for s in call.lookahead.sources]}
        weights = {call.index: WeightFile(self.root / entries[call.index]["weights"]) for call in calls}
        for group_id, members in enumerate(_groups(state, calls).values()):
            elastic = state.specs[members[0].index].elastic_width
            for bucket in (self.indices if elastic else [dense]):
                for size in self.sizes:
                    template = None
                    for call in members:
                        entries[call.index]["group"] = group_id
                        if template is None:
                            template = self._template(call, bucket, size)
                        file = self._write_verified(call, bucket, size, template, weights[call.index], entries)
                        entries[call.index]["graphs"].setdefault(str(bucket), {})[str(size)] = file
                        self.progress.update(1)
        return [entries[call.index] for call in calls]

    def _template(self, call: RecordedCall, bucket: int, size: int):
        example = cast_inputs(call.layout.resized(call.tensors, size), self.torch_dtype)
        program = BlockProgram(call.block, bucket, self.state.dense_bucket, call.layout, call.outputs, call.pooled,
                               call.lookahead)
        with cast_module(call.block, self.torch_dtype):
            return export_graph(program, example, f"block {self.state.specs[call.index].path}")

    def _write_verified(self, call, bucket, size, template, weights, entries) -> str:
        relative = f"blocks/{call.index:03d}/bucket{bucket}_b{size}.onnx"
        path = self.root / relative
        for attempt in range(2):
            proto, complex_inputs = template if attempt == 0 else self._template(call, bucket, size)
            tensors = block_tensors(call.block)
            if call.lookahead is not None:
                tensors.update(block_tensors(call.lookahead.router, "lookahead.router."))
            write_block_graph(proto, tensors, weights, path, self.torch_dtype)
            check_file(path)
            entries[call.index]["complex_inputs"] = complex_inputs
            if not self.verify_ort:
                return relative
            program = BlockProgram(call.block, bucket, self.state.dense_bucket, call.layout, call.outputs, call.pooled,
                                   call.lookahead)
            inputs = call.layout.resized(call.tensors, size)
            diff, scale = compare_block_file(path, program, inputs, self.dtype, self.torch_dtype, complex_inputs,
                                             self.threads)
            if within(diff, scale, self.dtype):
                entries[call.index]["max_abs_diff"] = max(entries[call.index]["max_abs_diff"], diff)
                self.worst = max(self.worst, diff)
                return relative
            logger.info("block %d bucket %d: shared template off by %.3g, exporting it on its own", call.index, bucket, diff)
        raise ExportError(f"{relative} to match PyTorch within {ATOL[self.dtype]} x max(1, |ref|)",
                          f"max |diff| {diff:.3g} (|ref| up to {scale:.3g})", "Report the model.")

    def router_graphs(self, calls: list[RecordedCall]) -> list[dict]:
        """One graph per router (dynamic batch, weights inline); routers of one shape share a template."""
        entries, templates = [], {}
        for call in calls:
            router = self.state.routers.get(call.index)
            if router is None:
                continue
            gate = gate_of(call.block)
            arguments = bind_to_signature(gate.signature, call.args, call.kwargs)
            example = [arguments[f.name] for f in router.features]
            program = RouterProgram(router)
            key = (repr(router.features), router.fc1.out_features, router.num_widths, router.num_actions,
                   tuple((tuple(t.shape), t.dtype) for t in example))
            relative = f"routers/router_{call.index:03d}.onnx"
            for attempt in range(2):
                if key not in templates or attempt:
                    # a batch of 1 would specialise the dynamic batch dimension (torch.export's 0/1 rule)
                    traced = [torch.cat([t, t]) if t.ndim and t.shape[0] == 1 else t for t in example]
                    templates[key], _ = export_graph(program, traced, f"router of block {call.index}",
                                                     dynamic_batch=True)
                write_block_graph(templates[key], block_tensors(router, "router."), None, self.root / relative)
                check_file(self.root / relative)
                if self._router_matches(program, example, call.batch, self.root / relative):
                    break
            else:
                raise ExportError(f"{relative} to match PyTorch", "a different result", "Report the model.")
            entries.append({"block": call.index, "file": relative, "inputs": [f.name for f in router.features],
                            "dynamic_batch": True})
            self.progress.update(1)
        return entries

    def _router_matches(self, program, example, batch: int, path: Path) -> bool:
        for rows in (slice(0, batch), slice(0, 1)):
            inputs = [t[rows] for t in example]
            with torch.no_grad():
                expected = list(program(*inputs))
            diff, scale = max_abs_diff(run_ort(path, inputs, torch.float32, [], self.threads), expected)
            if not within(diff, scale, "fp32"):
                return False
        return True


def export(model: nn.Module, example_inputs: Any, out_dir, buckets: Sequence[float] | None = None,
           dtype: str = "fp32", backend: str = "onnxruntime", batch_sizes: Sequence[int] | None = None, *,
           base_factory: str | None = None, scheduler: Any = None, sampling_config: Any = None,
           threads: int | None = None, runtime_check: Callable | None = None, progress: bool = False,
           trt_options: dict | None = None, router_summaries: bool = True, outside_graphs: bool = True,
           overwrite: bool = False) -> Path:
    """Export an elastic model (from ``transform`` or ``load``) to ``out_dir`` (see the module docstring).

    Args:
        model: the elastic PyTorch model; example_inputs: one real forward's arguments (fix all static shapes).
        buckets: width fractions to export (default all configured; the dense width is always exported).
        dtype: "fp32", "fp16" or "bf16" (block weights and floating inputs cast; bf16 only for TensorRT).
        backend: "onnxruntime" or "tensorrt" (ONNX graphs are written and verified in onnxruntime either way;
            with TensorRT installed, engines are also built into ``engines/``).
        batch_sizes: static batch sizes per graph (default 1 and the example batch).
        base_factory: ``package.module:factory`` for models that are not diffusers ModelMixins.
        scheduler, sampling_config: stored for ``Runtime.sample`` / ``elastic-compile run`` (optional).
        threads: onnxruntime intra-op threads for verification.
        runtime_check: called as ``runtime_check(model, example_inputs, staged_dir, dtype, bucket_indices,
            threads, backend, base_factory)`` once the staged artifact is complete, before it replaces ``out_dir`` (raising
            aborts the export); ``elastic_compile.export`` passes the runtime's own check
            (``serve/check.py``), so this package never imports the runtime that reads what it writes.
        router_summaries: block graphs also return the token summaries the next router reads and, for fp32
            onnxruntime exports, the next router's logits where that router reads only this block's inputs and
            outputs (default); False gives graphs with the block's outputs only (a dense deployment's baseline:
            routers then compute their features themselves).
        outside_graphs: also export the model's ops outside its blocks (embeddings, final layer...) as graphs and
            the forward as a program of graphs and block calls (``outside/``, manifest ``program``; fp32
            onnxruntime exports), so an onnxruntime runtime runs no PyTorch op outside the blocks for calls shaped
            like the example, at any batch size where the model allows a dynamic batch. A model that cannot be captured that way is exported without them
            (``program_note`` says why).

        overwrite: replace ``out_dir`` even when it is a non-empty directory that is not a previous export
            (deleting what it holds); a previous export is replaced without it, a regular file never.

    Returns the output directory. Nothing is left at ``out_dir`` (or its previous content is kept) when any
    step fails. Raises ExportError / ConfigError / DestinationError.
    """
    state = state_of(model)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    feature_cache, state.cache = getattr(state, "cache", None), None  # export and its checks run without reuse
    try:
        calls, shared = record_block_calls(model, example_inputs)
        if not router_summaries:
            for call in calls:
                call.pooled = []
        if router_summaries and dtype == "fp32" and backend == "onnxruntime":
            attach_lookaheads(state, calls)
        for call in calls:
            call.raw = None  # the recorded forward's objects: only identities were needed
        indices, sizes = _validate(model, state, buckets, dtype, backend, batch_sizes, max(c.batch for c in calls),
                                   base_factory)
        from tqdm.auto import tqdm
        total = sum(len(indices) if s.elastic_width else 1 for s in state.specs) * len(sizes) + len(state.routers)
        with staging_directory(out_dir, overwrite=overwrite, previous=mf.is_export) as root, tqdm(total=total, desc="export", disable=not progress) as bar:
            exporter = _Exporter(model, example_inputs, root, indices, sizes, dtype, threads, bar)
            blocks = exporter.block_graphs(calls)
            routers = exporter.router_graphs(calls)
            program, program_note = _outside_program(model, example_inputs, calls, root, dtype, backend, threads,
                                                     outside_graphs, lookaheads=router_summaries)
            base = save_base(model, state, root / "base", base_factory)
            save_elastic(model, root / "elastic")
            sampling = _save_sampling(root, scheduler, sampling_config)
            manifest = {
                "format": mf.FORMAT,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                           "fingerprint": state.fingerprint, "base": base},
                "elastic": "elastic", "config": state.config.to_dict(), "dtype": dtype, "opset": OPSET,
                "buckets": [state.config.width_buckets[i] for i in indices], "bucket_indices": indices,
                "dense_bucket": state.dense_bucket, "batch_sizes": sizes,
                "inputs": _describe(example_inputs), "blocks": blocks, "routers": routers,
                "program": program, "program_note": program_note,
                "runs_in_torch": {"modules": _runs_in_torch(model, state), "block_parameters_used_outside": shared},
                "backends": {"onnxruntime": {"graphs": True, "verified": exporter.verify_ort},
                             "tensorrt": {"engines": None}},
                "verification": {"onnxruntime": exporter.verify_ort, "atol": ATOL[dtype],
                                 "max_abs_diff": exporter.worst,
                                 "note": None if exporter.verify_ort else
                                 f"onnxruntime CPU cannot run {dtype} graphs: files passed onnx.checker only"},
                "sampling": sampling, "versions": mf.tool_versions(),
            }
            if backend == "tensorrt":
                manifest["backends"]["tensorrt"] = prebuild_engines(root, manifest, trt_options or {})
            manifest["export_seconds"] = round(time.perf_counter() - started, 2)
            manifest = mf.finalize(root, manifest)
            if runtime_check is not None and exporter.verify_ort:
                runtime_check(model, example_inputs, root, dtype, indices, threads, "onnxruntime", base_factory)
            if runtime_check is not None and manifest["backends"]["tensorrt"].get("engines"):
                runtime_check(model, example_inputs, root, dtype, indices, threads, "tensorrt", base_factory)
    finally:
        model.train(was_training)
        state.cache = feature_cache
    logger.info("exported %s in %.1f s (max |diff| vs torch %.3g)", out_dir, time.perf_counter() - started,
                manifest["verification"]["max_abs_diff"])
    return out_dir


def _outside_program(model, example_inputs, calls, root: Path, dtype: str, backend: str, threads,
                     wanted: bool, lookaheads: bool = False) -> tuple[dict | None, str | None]:
    """The manifest's ``program`` entry (see :mod:`.outside`), or None and the reason; ``lookaheads``: graphs
    also compute the router of the block right after them where they can."""
    if not wanted:
        return None, "not requested (outside_graphs=False)"
    if dtype != "fp32" or backend != "onnxruntime":
        return None, "exported for fp32 onnxruntime runtimes only; with TensorRT those parts run in PyTorch"
    try:
        return export_outside(model, example_inputs, calls, root, threads, lookaheads), None
    except Exception as exc:  # optional: any failure leaves those parts in PyTorch, never fails the export
        shutil.rmtree(root / "outside", ignore_errors=True)
        note = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        logger.info("the model's parts outside its blocks stay in PyTorch: %s", note)
        return None, note


def _save_sampling(root: Path, scheduler, sampling_config) -> dict:
    entry = {"scheduler": None, "config": None}
    if scheduler is not None:
        scheduler.save_pretrained(str(root / "scheduler"))
        entry["scheduler"] = {"path": "scheduler", "class": type(scheduler).__name__}
    if sampling_config is not None:
        sampling_config.save(root / "sampling.json")
        entry["config"] = "sampling.json"
    return entry
