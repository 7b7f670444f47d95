"""Resumable router training: a run killed at step k and resumed ends bitwise-equal to the uninterrupted run (1
and 2 gloo processes), the checkpoint is written atomically, and a resume with other settings is refused."""
import json

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import load_file

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import SamplingConfig
from elastic_compile.state import state_of
from elastic_compile.train import ClassConditionalRollout, record_class_conditional_trajectories, train_routers
from elastic_compile.train import resume as resume_module
from resume_worker import KillAt, Killed, run
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset, tiny_elastic_model
from zoo import ARCHITECTURES

ARGS = {**TRAIN_ARGS, "checkpoint_every": 4}
CONFIG = SamplingConfig(num_inference_steps=4, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)


def assert_same_run(a, b, report_a, report_b):
    ra, rb = router_state(a), router_state(b)
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    strip = [{**vars(e), "seconds": 0} for e in report_a.history]
    assert strip == [{**vars(e), "seconds": 0} for e in report_b.history]


def saved_step(directory, objective="step"):
    with safe_open(str(resume_module.resume_path(directory, objective)), framework="pt") as handle:
        return json.loads(handle.metadata()["state"])["step"]


def sampler_model(seed=0):
    model, inputs = ARCHITECTURES["dit"](seed=seed, batch=4)
    return ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0), skip_actions=("reuse", "forecast")),
                        example_inputs=inputs)


@pytest.fixture(scope="module")
def linked():
    model = sampler_model()
    return record_class_conditional_trajectories(model, FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                 samples_per_class=1, batch_size=10)


@pytest.mark.parametrize("variant", ["plain", "train_base", "batches"])
def test_a_killed_run_resumed_ends_bitwise_equal_to_the_uninterrupted_run(tmp_path, variant):
    options = {"plain": {}, "train_base": {"train_base": True, "base_lr": 1e-3}, "batches": {}}[variant]
    def data():
        if variant != "batches":
            return tiny_dataset()
        rows = tiny_dataset(size=64)   # an iterable of global batches: the data position is the batches done
        return [rows.batch(torch.arange(i, i + 16)) for i in range(0, 64, 16)]
    whole = tiny_elastic_model()
    expected = train_routers(whole, data(), checkpoint_dir=tmp_path / "whole", task_loss=KillAt(), **ARGS, **options)
    with pytest.raises(Killed):   # killed after step 6: steps 5 and 6 are lost, the checkpoint of step 4 stays
        train_routers(tiny_elastic_model(), data(), checkpoint_dir=tmp_path / "cut", task_loss=KillAt(6), **ARGS,
                      **options)
    assert saved_step(tmp_path / "cut") == 4
    resumed = tiny_elastic_model()
    report = train_routers(resumed, data(), checkpoint_dir=tmp_path / "cut", task_loss=KillAt(), resume=True, **ARGS,
                           **options)
    assert_same_run(whole, resumed, expected, report)
    if variant == "train_base":
        assert torch.equal(whole.blocks[0].mlp.fc1.weight, resumed.blocks[0].mlp.fc1.weight)
        assert not torch.equal(whole.blocks[0].mlp.fc1.weight, tiny_elastic_model().blocks[0].mlp.fc1.weight)
    assert saved_step(tmp_path / "cut") == 12


def test_cache_aware_run_resumes_with_its_stand_in_sampler(tmp_path, linked):
    args = {**ARGS, "cache_aware": True, "batch_size": 4, "steps": 7, "checkpoint_every": 3}
    whole = sampler_model()
    expected = train_routers(whole, linked, checkpoint_dir=tmp_path / "whole", task_loss=KillAt(), **args)
    with pytest.raises(Killed):
        train_routers(sampler_model(), linked, checkpoint_dir=tmp_path / "cut", task_loss=KillAt(5), **args)
    resumed = sampler_model()
    report = train_routers(resumed, linked, checkpoint_dir=tmp_path / "cut", task_loss=KillAt(), resume=True, **args)
    assert_same_run(whole, resumed, expected, report)


@pytest.mark.parametrize("recalibrate_every", [0, 1])
def test_rollout_run_resumes_with_its_budget_multiplier(tmp_path, recalibrate_every):
    """Also with the threshold recalibrated in the loop: the resumed run restores it, not the config's default."""
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=1)
    args = dict(objective="rollout", budget=0.5, steps=4, batch_size=2, lr=3e-3, seed=0, log_every=2, progress=False,
                checkpoint_every=2, calibrate=False, dual_init=1.0, dual_step=5.0,
                recalibrate_every=recalibrate_every)
    whole = sampler_model()
    expected = train_routers(whole, rollout, checkpoint_dir=tmp_path / "whole", **args)
    cut = sampler_model()
    original = resume_module._replace
    calls = []

    def kill_on_second_save(tmp, path):   # the second checkpoint dies between writing and renaming
        calls.append(tmp)
        if len(calls) == 2:
            raise Killed()
        original(tmp, path)
    resume_module._replace = kill_on_second_save
    try:
        with pytest.raises(Killed):
            train_routers(cut, rollout, checkpoint_dir=tmp_path / "cut", **args)
    finally:
        resume_module._replace = original
    assert saved_step(tmp_path / "cut", "rollout") == 2   # the last good checkpoint survived, the half-published one is aside
    assert calls[1].exists() and calls[1].name.startswith(".")
    resumed = sampler_model()
    report = train_routers(resumed, rollout, checkpoint_dir=tmp_path / "cut", resume=True, **args)
    assert_same_run(whole, resumed, expected, report)
    assert state_of(resumed).config.threshold == state_of(whole).config.threshold
    assert (state_of(whole).config.threshold != 0.5) == bool(recalibrate_every)


def test_a_kill_between_writing_and_renaming_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_elastic_model()
    train_routers(model, tiny_dataset(), checkpoint_dir=tmp_path, **{**ARGS, "steps": 4})
    before = resume_module.resume_path(tmp_path, "step").read_bytes()

    def killed(tmp, path):
        raise Killed()
    monkeypatch.setattr(resume_module, "_replace", killed)
    with pytest.raises(Killed):
        train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, **ARGS)
    assert resume_module.resume_path(tmp_path, "step").read_bytes() == before
    assert load_file(str(resume_module.resume_path(tmp_path, "step"))).keys() >= {"rng.data.0", "rng.torch.0"}


def test_resuming_with_other_settings_or_without_a_directory_is_refused(tmp_path):
    train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, **{**ARGS, "steps": 4})
    with pytest.raises(ConfigError, match="lr: checkpoint 0.003, now 0.001"):
        train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, resume=True,
                      **{**ARGS, "steps": 4, "lr": 1e-3})
    with pytest.raises(ConfigError, match="TrajectoryDataset:128"):
        train_routers(tiny_elastic_model(), tiny_dataset(size=64), checkpoint_dir=tmp_path, resume=True,
                      **{**ARGS, "steps": 4})
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        train_routers(tiny_elastic_model(), tiny_dataset(), resume=True, **ARGS)
    resume_module.resume_path(tmp_path, "step").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="training checkpoint"):
        train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, resume=True, **ARGS)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    a, b = tiny_elastic_model(), tiny_elastic_model()
    ra = train_routers(a, tiny_dataset(), checkpoint_dir=tmp_path / "a", **ARGS)
    rb = train_routers(b, tiny_dataset(), checkpoint_dir=tmp_path / "b", resume=True, **ARGS)
    assert_same_run(a, b, ra, rb)


def test_two_gloo_processes_killed_and_resumed_end_bitwise_equal(tmp_path):
    mp.spawn(run, args=(str(tmp_path),), nprocs=2, join=True)
    whole, resumed = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    initial = router_state(tiny_elastic_model())
    assert any(not torch.equal(whole[k], initial[k]) for k in whole)   # it trained
    saved = load_file(str(resume_module.resume_path(tmp_path / "cut", "step")))
    assert not torch.equal(saved["rng.staleness.0"], saved["rng.staleness.1"])   # each rank's own stream


def test_the_json_log_has_each_step_once_with_an_eta_after_a_resume(tmp_path):
    args = {**ARGS, "log_every": 1}
    with pytest.raises(Killed):   # logged steps 1..5, then killed in step 6; the checkpoint is of step 4
        train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, task_loss=KillAt(6), **args)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    with open(tmp_path / "train_log.jsonl", "a") as handle:
        handle.write('{"objective": "step", "st')   # a line cut by the kill
    train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=tmp_path, task_loss=KillAt(), resume=True,
                  **args)
    entries = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, 13))
    assert all(e["objective"] == "step" and e["eta_seconds"] >= 0 for e in entries) and entries[-1]["eta_seconds"] == 0
    assert entries[0]["eta_seconds"] > 0
