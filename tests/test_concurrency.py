"""One elastic model (PyTorch, and an exported ONNX Runtime runtime) called from several threads at once gives
exactly what the same calls give one after another: per-call decisions, width switches, ``force``, ``stats`` and
the feature cache's rows are the calling thread's; weights and routers are shared.

Workloads: 8 threads x 10 generations of the bundled reference model with its bundled routers (few steps), with
and without the feature cache, compared bit for bit with the same generations run serially; and 8 threads x 10
forwards of a small DiT with two width buckets and random routers (mixed per-sample plans, sub-batches)."""
import copy
import threading

import pytest
import torch

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import sample
from elastic_compile.sampling.hooks import SamplerHooks
from elastic_compile.serving import restore_serving
from elastic_compile.state import state_of
from helpers import randomize_routers, reference_case
from zoo import ARCHITECTURES, first_output

THREADS = 8
PER_THREAD = 10
STEPS = 4


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Each caller on one PyTorch thread (the test machine's cores are few: 8 callers x an OpenMP team each would
    spin on them); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_threads(work, threads=THREADS):
    """``work(k)`` in ``threads`` threads started together; their results in thread order (re-raises errors)."""
    results, errors = [None] * threads, []
    barrier = threading.Barrier(threads)

    def body(k):
        try:
            barrier.wait()
            results[k] = work(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=body, args=(k,)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return results


def decisions_of(model):
    """The calling thread's last forward as ``stats`` reports it: per block, per sample (run, width, reused)."""
    report = ec.stats(model)
    return ([[(d.run, d.width, d.reused) for d in block] for block in report.decisions if block is not None],
            report.executed_flops)


class BranchOnly(SamplerHooks):
    """A sampler's cache contexts without any reset: what a user who forgets ``reset_cache`` runs."""

    def __init__(self, model):
        self.model = model

    def branch(self, name, step):
        return ec.cache_context(self.model, name)


@pytest.fixture(scope="module")
def reference():
    """``(elastic reference model with its bundled routers, scheduler, sampling config, base model)``."""
    base, _, scheduler, config = reference_case()
    from elastic_compile.reference import ASSETS_DIR
    model = ec.load(copy.deepcopy(base), ASSETS_DIR / "routers", cache="off")
    return model, scheduler, config, base


@pytest.fixture(scope="module")
def reference_runtime(reference, tmp_path_factory):
    """The reference model exported for ONNX Runtime (batch 2: one label with classifier-free guidance)."""
    model, scheduler, config, _ = reference
    inputs = dict(hidden_states=torch.randn(2, 1, 8, 8), timestep=torch.tensor([500.0, 500.0]),
                  class_labels=torch.tensor([3, 10]), return_dict=False)
    out = tmp_path_factory.mktemp("concurrency") / "reference"
    ec.export(model, inputs, out, batch_sizes=[2], threads=1)
    return ec.runtime.load(out, threads=1, cache="off")


def generations(denoiser, scheduler, config, hooks_for, cached):
    """The 8 x 10 workload: generation (thread k, j) samples label (k + j) % 10 from seed 100 k + j. Returns
    ``work(k)`` giving thread k's images and, per generation, its last forward's decisions."""
    def work(k):
        out = []
        for j in range(PER_THREAD):
            image = sample(denoiser, scheduler, [(k + j) % 10], config, seed=100 * k + j, num_inference_steps=STEPS,
                           hooks=hooks_for(denoiser) if cached else None)
            out.append((image, decisions_of(denoiser)))
        return out
    return work


def assert_same(concurrent, serial):
    for k, (got, want) in enumerate(zip(concurrent, serial)):
        for j, ((image, decided), (image_serial, decided_serial)) in enumerate(zip(got, want)):
            assert torch.equal(image, image_serial), f"thread {k}, generation {j}"
            assert decided == decided_serial, f"stats of thread {k}, generation {j}"


@pytest.mark.parametrize("cached", ["off", "hooks", "plain"])
@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_threads_generate_what_serial_calls_generate(reference, reference_runtime, kind, cached):
    """``plain``: the cache as ``ec.load`` serves it, calls outside any context (``serving.py``): each thread's
    timesteps give its own branches and resets."""
    model, scheduler, config, _ = reference
    denoiser = model if kind == "torch" else reference_runtime
    state = state_of(denoiser)
    if cached == "hooks":
        ec.apply_feature_cache(denoiser)
    elif cached == "plain":
        assert restore_serving(denoiser if kind == "torch" else denoiser.model)
    try:
        work = generations(denoiser, scheduler, config, ElasticCacheHooks, cached == "hooks")
        serial = [work(k) for k in range(THREADS)]
        concurrent = run_threads(work)
    finally:
        state.cache = None
    assert_same(concurrent, serial)
    images = torch.stack([image for thread in serial for image, _ in thread])
    assert len({tuple(image.flatten().tolist()) for image in images}) == THREADS * PER_THREAD  # all distinct
    if cached != "off":  # the cache served some blocks: the test covers it
        assert any(any(r for block in decided[0] for _, _, r in block) for thread in serial for _, decided in thread)


def test_cache_without_resets_in_threads_equals_serial(reference):
    """Generations with the cache and no reset at all (a new generation is detected by its timesteps), threads
    against serial: each thread's rows are its own."""
    model, scheduler, config, _ = reference
    ec.apply_feature_cache(model)
    try:
        work = generations(model, scheduler, config, BranchOnly, True)
        serial = [work(k) for k in range(THREADS)]
        concurrent = run_threads(work)
    finally:
        state_of(model).cache = None
    assert_same(concurrent, serial)


@pytest.fixture(scope="module")
def mixed_widths():
    """A small diffusers DiT with width buckets (1/2, 1) and random routers: per-sample skips and widths."""
    model, inputs = ARCHITECTURES["dit"](seed=0, batch=4)
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    randomize_routers(model, seed=1)
    return model, inputs


def varied(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    out["hidden_states"] = torch.randn(inputs["hidden_states"].shape, generator=g)
    out["timestep"] = torch.randint(0, 1000, inputs["timestep"].shape, generator=g)
    return out


def forwards(model, inputs):
    def work(k):
        out = []
        for j in range(PER_THREAD):
            with torch.no_grad():
                output = first_output(model(**varied(inputs, 100 * k + j)))
            out.append((output, decisions_of(model)))
        return out
    return work


def test_threads_with_mixed_widths_equal_serial(mixed_widths):
    model, inputs = mixed_widths
    work = forwards(model, inputs)
    serial = [work(k) for k in range(THREADS)]
    widths = {w for thread in serial for _, (blocks, _) in thread for block in blocks for _, w, _ in block}
    assert {0.5, 1.0, None} <= widths  # samples skip, run narrow and run dense: mixed plans
    assert_same(run_threads(work), serial)


def test_runtime_threads_with_mixed_widths_equal_serial(tiny_export):
    out, model, inputs = tiny_export
    runtime = ec.runtime.load(out, threads=1)
    work = forwards(runtime, inputs)
    serial = [work(k) for k in range(THREADS)]
    assert_same(run_threads(work), serial)
    with torch.no_grad():  # and the runtime is the PyTorch model under the same decisions
        for j in range(3):
            call = varied(inputs, j)
            assert torch.allclose(first_output(runtime(**call)), first_output(model(**call)), atol=1e-4)


def test_force_holds_in_its_own_thread_only(mixed_widths):
    model, inputs = mixed_widths
    with torch.no_grad():
        routed = first_output(model(**inputs))
        routed_decisions = decisions_of(model)
        with ec.force(model, skip=False, width=0.5):
            forced = first_output(model(**inputs))
            forced_decisions = decisions_of(model)
    assert not torch.allclose(routed, forced)
    entered, other_done = threading.Event(), threading.Event()
    results = {}

    def forcing():
        with ec.force(model, skip=False, width=0.5):
            entered.set()
            other_done.wait(timeout=60)
            with torch.no_grad():
                results["forced"] = first_output(model(**inputs)), decisions_of(model)

    def other():
        entered.wait(timeout=60)
        with torch.no_grad():
            results["other"] = first_output(model(**inputs)), decisions_of(model)
        other_done.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results["other"][0], routed) and results["other"][1] == routed_decisions
    assert torch.equal(results["forced"][0], forced) and results["forced"][1] == forced_decisions
    assert state_of(model).forced is None  # and nothing is left pinned here


def test_stats_report_the_calling_threads_last_forward(mixed_widths):
    model, inputs = mixed_widths
    small = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in inputs.items()}
    with torch.no_grad():
        model(**inputs)
        want_big = decisions_of(model)
        model(**small)
        want_small = decisions_of(model)
    first_done, second_done = threading.Event(), threading.Event()
    got = {}

    def big():
        with torch.no_grad():
            model(**inputs)
        first_done.set()
        second_done.wait(timeout=60)  # the other thread's forward (another batch size) ran in between
        got["big"] = decisions_of(model)

    def small_one():
        first_done.wait(timeout=60)
        with torch.no_grad():
            model(**small)
        got["small"] = decisions_of(model)
        second_done.set()

    def idle():
        first_done.wait(timeout=60)
        try:
            ec.stats(model)
            got["idle"] = "no error"
        except ConfigError:
            got["idle"] = "no forward"

    threads = [threading.Thread(target=f) for f in (big, small_one, idle)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == {"big": want_big, "small": want_small, "idle": "no forward"}
    assert len(want_big[0][0]) == 4 and len(want_small[0][0]) == 1
