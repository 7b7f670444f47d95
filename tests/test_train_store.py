"""The trajectory store: recording to sharded safetensors (one process or rank-parallel) keeps exactly what
in-memory recording keeps, step links included; training streams from it with a seeded rank-disjoint sampler."""
import pytest
import torch
import torch.multiprocessing as mp
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import SamplingConfig, denoiser_output
from elastic_compile.train import TrajectoryStore, record_class_conditional_trajectories, train_routers
from elastic_compile.train.cache_aware import dense_stand_ins
from elastic_compile.train.store import EpochSampler
from elastic_compile.train.trajectories import TEACHER_KEY
from train_fixtures import router_state
from zoo import ARCHITECTURES

CONFIG = SamplingConfig(num_inference_steps=3, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)
ROWS = 10 * 2 * 3   # classes x CFG branches x steps


def sampler_model(seed=0):
    model, inputs = ARCHITECTURES["dit"](seed=seed, batch=4)
    return ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0), skip_actions=("reuse", "forecast")),
                        example_inputs=inputs)


def record(out=None, **options):
    return record_class_conditional_trajectories(sampler_model(), FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                 samples_per_class=1, batch_size=4, out=out, **options)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    return record(), record(directory, shard_mb=0.001), directory


def test_the_store_holds_exactly_the_in_memory_recording_and_the_dense_outputs(recorded):
    memory, store, directory = recorded
    assert len(store) == len(memory) == ROWS
    assert len(store.index["shards"]) > 3   # one shard per denoiser call at this shard size
    everything = store.batch(torch.arange(ROWS))
    for key, value in memory.rows.items():
        assert torch.equal(everything[key], value), key
    assert torch.equal(store.previous, memory.previous)
    assert {k: v for k, v in everything.items() if k not in memory.rows and k != TEACHER_KEY} == memory.shared
    model = sampler_model()
    picked = torch.tensor([5, 0, 59, 17, 17])
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        dense = denoiser_output(model(**memory.batch(picked)))
    torch.testing.assert_close(store.batch(picked)[TEACHER_KEY], dense, atol=1e-6, rtol=1e-5)
    assert store.batch(torch.tensor([], dtype=torch.long))["hidden_states"].shape == (0, 4, 8, 8)
    with pytest.raises(ConfigError, match="row indices"):
        store.batch(torch.tensor([ROWS]))


def test_rank_parallel_recording_holds_the_same_rows_and_links(recorded, tmp_path):
    _, single, _ = recorded
    mp.spawn(_record_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    parallel = TrajectoryStore(tmp_path / "store")
    assert len(parallel) == ROWS and {s["file"][:8] for s in parallel.index["shards"]} == {"part-000", "part-001"}
    a, b = single.batch(torch.arange(ROWS)), parallel.batch(torch.arange(ROWS))
    key = lambda rows, i: (rows["hidden_states"][i].flatten().tolist(), float(rows["timestep"][i]),  # noqa: E731
                           int(rows["class_labels"][i]))
    where = {tuple(map(str, key(a, i))): i for i in range(ROWS)}
    to_single = torch.tensor([where[tuple(map(str, key(b, i)))] for i in range(ROWS)])
    assert sorted(to_single.tolist()) == list(range(ROWS))   # the same rows, each once
    for name in a:
        if isinstance(a[name], torch.Tensor) and a[name].ndim:
            assert torch.equal(b[name], a[name][to_single]), name
    # links survive: the previous row of a row is, in the single-process store, the previous of the same row
    linked = parallel.previous >= 0
    assert torch.equal(linked, single.previous[to_single] >= 0)
    assert torch.equal(to_single[parallel.previous[linked]], single.previous[to_single][linked])


def _record_two_ranks(rank, directory):
    from store_worker import record as run
    run(rank, directory)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), share=st.integers(1, 8), world=st.integers(1, 4), seed=st.integers(0, 2 ** 31))
def test_epoch_sampler_is_seeded_rank_disjoint_and_covers_each_epoch(n, share, world, seed):
    batch = share * world
    sampler, again = EpochSampler(n, batch, seed), EpochSampler(n, batch, seed)
    steps = (3 * n) // batch + 2
    stream = torch.cat([sampler.rows(b) for b in range(steps)])
    backwards = [again.rows(b) for b in reversed(range(steps))]   # stateless in the step: any order, same rows
    assert torch.equal(stream, torch.cat(backwards[::-1]))
    for epoch in range(len(stream) // n):   # each complete epoch: every row exactly once
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    for b in range(steps):
        shares = [sampler.share(b, r, world) for r in range(world)]
        assert torch.equal(torch.cat(shares), sampler.rows(b))   # ranks take disjoint parts of one global batch


def test_training_from_the_store_equals_training_on_the_same_rows_in_memory(recorded):
    memory, store, _ = recorded
    args = dict(budget=0.5, steps=6, batch_size=8, lr=3e-3, seed=3, log_every=2, progress=False)
    streamed = sampler_model()
    report = train_routers(streamed, store, **args)
    sampler = EpochSampler(len(store), 8, 3)
    batches = [memory.batch(sampler.rows(b)) for b in range(6)]   # the store's row order, dense targets recomputed
    in_memory = sampler_model()
    expected = train_routers(in_memory, batches, **args)
    initial, a, b = router_state(sampler_model()), router_state(streamed), router_state(in_memory)
    for key in a:
        moved = (b[key] - initial[key]).abs().max()
        assert (a[key] - b[key]).abs().max() <= 1e-3 * moved + 1e-6, key
    assert report.final.executed_fraction == pytest.approx(expected.final.executed_fraction, abs=1e-3)
    again = sampler_model()
    train_routers(again, store, **args)
    assert all(torch.equal(v, router_state(again)[k]) for k, v in a.items())   # seeded: bitwise repeatable


def test_cache_aware_training_streams_stand_ins_from_the_stores_links(recorded, tmp_path):
    memory, store, _ = recorded
    model = sampler_model()
    rows = torch.tensor([0, 7, 33, 59, 40, 21])
    ages, spacings = torch.tensor([1, 2, 1, 2, 1, 2]), torch.tensor([1, 1, 2, 2, 3, 1])
    a = dense_stand_ins(model, memory, rows, (TEACHER_KEY,), 2, ages=ages, spacings=spacings)
    b = dense_stand_ins(model, store, rows, (TEACHER_KEY,), 2, ages=ages, spacings=spacings)
    assert a.keys() == b.keys()
    for block in a:
        for leaf in a[block]:
            assert torch.equal(a[block][leaf], b[block][leaf])
            assert a[block][leaf].abs().max() > 0
    args = dict(budget=0.5, steps=5, batch_size=4, lr=3e-3, seed=0, log_every=5, progress=False, cache_aware=True,
                checkpoint_dir=tmp_path, checkpoint_every=2)
    report = train_routers(model, store, **args)
    assert report.final.step == 5 and 0 < report.final.executed_fraction <= 1.05
    fresh = ec.load(ARCHITECTURES["dit"](seed=0, batch=4)[0], tmp_path / "final")
    assert all(torch.equal(v, router_state(fresh)[k]) for k, v in router_state(model).items())


def test_an_incomplete_store_is_a_typed_error(tmp_path):
    (tmp_path / "part-000-00000.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="interrupted recording has no index.json"):
        TrajectoryStore(tmp_path)


def test_a_run_streaming_from_the_store_resumes_bitwise(recorded, tmp_path):
    from resume_worker import KillAt, Killed
    _, store, _ = recorded
    args = dict(budget=0.5, steps=6, batch_size=8, lr=3e-3, seed=1, log_every=2, progress=False, checkpoint_every=2)
    whole = sampler_model()
    train_routers(whole, store, checkpoint_dir=tmp_path / "whole", task_loss=KillAt(), **args)
    with pytest.raises(Killed):
        train_routers(sampler_model(), store, checkpoint_dir=tmp_path / "cut", task_loss=KillAt(4), **args)
    resumed = sampler_model()
    train_routers(resumed, TrajectoryStore(store.directory), checkpoint_dir=tmp_path / "cut", task_loss=KillAt(),
                  resume=True, **args)
    assert all(torch.equal(v, router_state(resumed)[k]) for k, v in router_state(whole).items())
