"""Interrupted saves and exports: a process killed (SIGKILL) or an exception at each step of a write leaves either
the previous artifact or the new one, and the next load or save finishes or undoes it and removes the rest."""
import copy
import os
import shutil
import signal
import time

import pytest
import torch

import elastic_compile as ec
from elastic_compile import serialization
from elastic_compile.artifact import commit
from elastic_compile.errors import ArtifactError
from helpers import randomize_routers
from security_helpers import dead_pid
from zoo import ARCHITECTURES

STEPS = ("writing", "staged", "ready", "moved_aside", "swapped", "cleaned")
#: Which artifact a load finds after a kill at each step, when a previous one was there: the write takes effect
#: once its new directory is complete and the previous one has been moved aside.
AFTER_KILL = {"writing": "old", "staged": "old", "ready": "old", "moved_aside": "new", "swapped": "new",
              "cleaned": "new"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pristine base, two elastic versions of it (other routers) and the bytes each one saves."""
    base, inputs = ARCHITECTURES["reference_dit"](seed=0)
    versions = {}
    for name, seed in (("old", 2), ("new", 5)):
        model = ec.transform(copy.deepcopy(base), example_inputs=inputs)
        randomize_routers(model, seed=seed)
        reference = tmp_path_factory.mktemp(name) / "a"
        ec.save(model, reference)
        versions[name] = (model, (reference / "routers.safetensors").read_bytes())
    return base, versions


def _kill_at(step: str):
    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if step == "writing":  # killed after the first file of the staged artifact
        real = serialization.save_file
        serialization.save_file = lambda *a, **k: (real(*a, **k), kill())
    else:
        commit.step_hook = lambda name: kill() if name == step else None


def save_killed_at(model, target, step: str) -> None:
    """``ec.save(model, target)`` in a forked child that SIGKILLs itself at ``step``."""
    pid = os.fork()
    if pid == 0:  # the child: no test machinery, no cleanup, no exit handlers
        try:
            torch.set_num_threads(1)
            _kill_at(step)
            ec.save(model, target)
        finally:
            os._exit(3)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"the save killed at {step!r} did not end")
        time.sleep(0.01)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {step}"


def _found(target, versions) -> str | None:
    if not (target / "routers.safetensors").is_file():
        return None
    data = (target / "routers.safetensors").read_bytes()
    return next(name for name, (_, saved) in versions.items() if saved == data)


@pytest.mark.parametrize("previous,step", [(True, step) for step in STEPS] +
                         [(False, step) for step in STEPS if step != "moved_aside"],  # nothing to move aside
                         ids=[f"over-an-artifact-{s}" for s in STEPS] + [f"fresh-{s}" for s in STEPS if s != "moved_aside"])
def test_a_kill_at_each_step_is_recovered_by_the_next_load(models, tmp_path, step, previous):
    base, versions = models
    target = tmp_path / "artifact"
    if previous:
        ec.save(versions["old"][0], target)
    save_killed_at(versions["new"][0], target, step)
    expected = AFTER_KILL[step] if previous else ("new" if step not in ("writing", "staged") else None)
    if expected is None:
        with pytest.raises(ArtifactError, match="elastic.json"):
            ec.load(copy.deepcopy(base), target)
    else:
        ec.load(copy.deepcopy(base), target)
    assert _found(target, versions) == expected
    assert sorted(os.listdir(tmp_path)) == (["artifact"] if expected else [])


@pytest.mark.parametrize("step", ["writing", "ready", "moved_aside"])
def test_the_next_save_also_recovers_and_cleans_up(models, tmp_path, step):
    _, versions = models
    target = tmp_path / "artifact"
    ec.save(versions["old"][0], target)
    save_killed_at(versions["new"][0], target, step)
    ec.save(versions["old"][0], target)
    assert _found(target, versions) == "old" and os.listdir(tmp_path) == ["artifact"]


@pytest.mark.parametrize("step", STEPS[1:])
def test_an_exception_at_each_step_leaves_one_artifact_and_no_litter(models, tmp_path, step, monkeypatch):
    _, versions = models
    target = tmp_path / "artifact"
    ec.save(versions["old"][0], target)

    def fail(name):
        if name == step:
            raise RuntimeError(f"injected at {step}")
    monkeypatch.setattr(commit, "step_hook", fail)
    with pytest.raises(RuntimeError, match="injected"):
        ec.save(versions["new"][0], target)
    assert _found(target, versions) == ("new" if step in ("swapped", "cleaned") else "old")
    assert os.listdir(tmp_path) == ["artifact"]


def test_directories_of_live_or_unknown_writers_are_left_alone(models, tmp_path):
    base, versions = models
    target = tmp_path / "artifact"
    ec.save(versions["old"][0], target)
    live = tmp_path / f".artifact.staging-{commit.HOST}-{os.getpid()}-abc"
    elsewhere = tmp_path / ".artifact.old-00000000-1-abc"
    dead = tmp_path / f".artifact.staging-{commit.HOST}-{dead_pid()}-abc"
    for directory in (live, elsewhere, dead):
        directory.mkdir()
        (directory / "part").write_text("half written")
    ec.load(copy.deepcopy(base), target)
    assert live.is_dir() and elsewhere.is_dir() and not dead.exists()


def test_an_export_killed_mid_swap_is_recovered_and_its_staging_litter_removed(tiny_export, tmp_path):
    out, model, inputs = tiny_export
    pid = dead_pid()
    shutil.copytree(out, tmp_path / f".export.ready-{commit.HOST}-{pid}-x1")  # killed between the two renames
    shutil.copytree(out, tmp_path / f".export.old-{commit.HOST}-{pid}-x2")
    (tmp_path / f".export.staging-{commit.HOST}-{pid}-x3").mkdir()  # and an earlier export's staging
    runtime = ec.runtime.load(tmp_path / "export", threads=1)
    assert os.listdir(tmp_path) == ["export"]
    with torch.no_grad():
        torch.testing.assert_close(runtime(**inputs)[0], model(**inputs)[0], atol=1e-4, rtol=0)
