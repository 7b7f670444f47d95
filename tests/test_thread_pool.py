"""ONNX Runtime's process-wide resources for a runtime's sessions: the shared (global) thread pool (process-wide
for every session, so everything that turns it on runs in a subprocess) and the shared CPU memory arena (only
sessions that opt in use it)."""
import subprocess
import sys
import textwrap

import pytest
import torch

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.backends.onnxruntime import OnnxRuntimeBackend
from helpers import randomize_routers, reference_case
from zoo import first_output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The reference model (it has a sampler, for the CLI) with randomized routers (mixed plans), batch 4."""
    model, inputs, scheduler, config = reference_case()
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    out = tmp_path_factory.mktemp("pool") / "reference"
    ec.export(model, inputs, out, batch_sizes=[4], scheduler=scheduler, sampling_config=config, threads=1)
    torch.save(inputs, out.parent / "inputs.pt")
    return inputs, out


SCRIPT = textwrap.dedent("""
    import sys, torch, onnxruntime as ort
    import elastic_compile as ec
    from elastic_compile.errors import ConfigError
    out, inputs_file, result_file = sys.argv[1:4]
    inputs = torch.load(inputs_file)
    first = lambda o: o[0] if isinstance(o, (tuple, list)) else getattr(o, "sample", o)
    runtime = ec.runtime.load(out, thread_pool="shared", threads=2)
    with torch.no_grad():
        routed = first(runtime(**inputs))
        with ec.force(runtime, skip={1}, width=0.5):
            forced = first(runtime(**inputs))
    sessions = [g.session for g in runtime.backend._graphs.values()]
    shared = all(not s.get_session_options().use_per_session_threads for s in sessions)
    try:
        ec.runtime.load(out, thread_pool="shared", threads=3)
        clash = "no error"
    except ConfigError as exc:
        clash = str(exc)
    later = ec.runtime.load(out, threads=2)  # per-session requested: the process-wide pool is on, so it is used
    with torch.no_grad():
        later_out = first(later(**inputs))
    later_shared = all(not g.session.get_session_options().use_per_session_threads
                       for g in later.backend._graphs.values())
    torch.save(dict(routed=routed, forced=forced, later=later_out, shared=shared, sessions=len(sessions),
                    clash=clash, later_shared=later_shared), result_file)
""")


def test_shared_pool_gives_the_per_session_outputs_and_stays_process_wide(exported, tmp_path):
    inputs, out = exported
    runtime = ec.runtime.load(out)  # per-session pools in this process
    with torch.no_grad():
        routed = first_output(runtime(**inputs))
        with ec.force(runtime, skip={1}, width=0.5):
            forced = first_output(runtime(**inputs))
    assert all(g.session.get_session_options().use_per_session_threads for g in runtime.backend._graphs.values())
    result_file = tmp_path / "result.pt"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(out.parent / "inputs.pt"), str(result_file)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(result_file)
    assert result["shared"] and result["sessions"] >= 2
    torch.testing.assert_close(result["routed"], routed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["forced"], forced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["later"], routed, atol=1e-5, rtol=1e-5)
    assert result["later_shared"]
    assert "shared pool already runs 2" in result["clash"] and "threads=2" in result["clash"]


def test_unknown_thread_pool_is_a_config_error(exported):
    with pytest.raises(ConfigError, match="thread_pool"):
        OnnxRuntimeBackend(thread_pool="global")


def _arena_entries(runtime) -> set[str]:
    """Each session's "session.use_env_allocators" option ("" where it is not set)."""
    def entry(options):
        try:
            return options.get_session_config_entry("session.use_env_allocators")
        except RuntimeError:  # onnxruntime raises for an option never set
            return ""
    return {entry(g.session.get_session_options()) for g in runtime.backend._graphs.values()}


def test_sessions_share_one_memory_arena_by_default_with_the_same_outputs(exported):
    """Every graph of a default runtime (blocks, routers' summaries, the parts outside the blocks) takes its memory
    from the process's shared arena; 'per_session' keeps ONNX Runtime's own arena per graph. Same numbers either
    way, routed and at a forced plan, across repeated calls (buffers reused between graphs hold nothing stale)."""
    inputs, out = exported
    shared, own = ec.runtime.load(out), ec.runtime.load(out, memory_arena="per_session")
    results = {}
    with torch.no_grad():
        for name, runtime in (("shared", shared), ("own", own)):
            routed = [first_output(runtime(**inputs)) for _ in range(2)]
            with ec.force(runtime, skip={1}, width=0.5):
                forced = first_output(runtime(**inputs))
            results[name] = routed + [forced]
    assert _arena_entries(shared) == {"1"} and len(shared.backend._graphs) >= 3
    assert _arena_entries(own) == {""}
    torch.testing.assert_close(results["shared"][0], results["shared"][1], atol=0, rtol=0)
    for a, b in zip(results["shared"], results["own"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert ec.stats(shared).decisions == ec.stats(own).decisions


def test_unknown_memory_arena_is_a_config_error():
    with pytest.raises(ConfigError, match="memory_arena in"):
        OnnxRuntimeBackend(memory_arena="global")


def test_cli_run_shares_one_pool_by_default_with_the_same_images(exported, tmp_path):
    from elastic_compile.cli import main
    _, out = exported
    common = ["run", str(out), "--classes", "0,1", "--steps", "2", "--threads", "1", "--width", "0.5", "--cache", "off"]
    assert main(common + ["--thread-pool", "per_session", "--out", str(tmp_path / "per_session.pt")]) == 0
    done = subprocess.run([sys.executable, "-m", "elastic_compile.cli"] + common + ["--out", str(tmp_path / "shared.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "shared.pt"), torch.load(tmp_path / "per_session.pt"),
                               atol=1e-5, rtol=0)


def test_a_global_pool_turned_on_by_the_application_is_used(exported, tmp_path):
    inputs, out = exported
    script = textwrap.dedent("""
        import sys, torch, onnxruntime as ort
        import elastic_compile as ec
        ort.set_global_thread_pool_sizes(1, 1)  # the application's own choice, before loading the runtime
        runtime = ec.runtime.load(sys.argv[1], threads=1)  # per-session requested: ORT would refuse it
        with torch.no_grad(), ec.force(runtime, skip=False, width=0.5):
            runtime(**torch.load(sys.argv[2]))
        print(all(not g.session.get_session_options().use_per_session_threads for g in runtime.backend._graphs.values()))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(out), str(out.parent / "inputs.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("True")
