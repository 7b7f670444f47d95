"""``train_routers(shard_base=True)``: the frozen base sharded by FSDP2 across 2 gloo processes trains the same
routers as DDP and as one process with the same global batch, each rank holding only its shard of the base."""
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.state import state_of
from elastic_compile.train import train_routers
from shard_worker import run, run_rollouts
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset, tiny_elastic_model
from zoo import ARCHITECTURES


def test_sharded_base_trains_the_routers_of_ddp_and_of_one_process(tmp_path):
    mp.spawn(run, args=(str(tmp_path),), nprocs=2, join=True)
    ddp, sharded = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "sharded.safetensors"))
    initial = router_state(tiny_elastic_model())
    assert ddp.keys() == sharded.keys() == initial.keys()
    assert any(not torch.equal(sharded[k], initial[k]) for k in sharded)   # it trained
    for key in ddp:   # the same averaged gradients as DDP: the same routers
        torch.testing.assert_close(sharded[key], ddp[key], atol=1e-7, rtol=1e-6)
    resumed = load_file(str(tmp_path / "resumed.safetensors"))   # killed at 6, resumed with checkpointing
    for key in ddp:
        torch.testing.assert_close(resumed[key], sharded[key], atol=1e-7, rtol=1e-6)
    single = tiny_elastic_model()
    train_routers(single, tiny_dataset(), **TRAIN_ARGS)
    expected = router_state(single)
    for key in expected:   # as tests/test_train.py: float32 summation order, amplified by Adam on tiny gradients
        moved = (expected[key] - initial[key]).abs().max()
        assert (sharded[key] - expected[key]).abs().max() <= 0.02 * moved + 1e-6, key

    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks["calls"] == TRAIN_ARGS["steps"] and checks["not_dtensor"] == []
    # rank 0 held its half (rounded up per weight's rows) of every block weight, never the whole
    assert checks["full"] > 0 and 0.45 * checks["full"] <= checks["local"] <= 0.55 * checks["full"]
    assert checks["uses"] > 0 and checks["sharded_uses"] == 0   # every projection ran on gathered weights

    outputs = load_file(str(tmp_path / "outputs.safetensors"))   # the model works whole again after training
    torch.testing.assert_close(outputs["sharded"], outputs["ddp"], atol=1e-6, rtol=1e-5)
    fresh, _ = ARCHITECTURES["reference_dit"](seed=0, batch=4)
    ec.load(fresh, tmp_path / "whole" / "final")
    loaded = {f"{i}.{k}": v for i, r in state_of(fresh).routers.items() for k, v in r.state_dict().items()}
    assert loaded.keys() == sharded.keys() and all(torch.equal(loaded[k], sharded[k]) for k in loaded)


def test_shard_base_with_base_fine_tuning_is_refused():
    with pytest.raises(ConfigError, match="shard_base"):
        train_routers(tiny_elastic_model(), tiny_dataset(), shard_base=True, train_base=True, **TRAIN_ARGS)


def test_sharded_base_trains_the_routers_of_replicated_rollouts(tmp_path):
    mp.spawn(run_rollouts, args=(str(tmp_path),), nprocs=2, join=True)
    replicated = load_file(str(tmp_path / "replicated.safetensors"))
    sharded = load_file(str(tmp_path / "sharded.safetensors"))
    assert replicated.keys() == sharded.keys()
    for key in replicated:
        torch.testing.assert_close(sharded[key], replicated[key], atol=1e-7, rtol=1e-6)
    # the mid-run artifact, saved from the gathered base, loads (fingerprints checked) with the replicated run's routers
    steps = {}
    for shard in (False, True):
        fresh, _ = ARCHITECTURES["dit"](seed=0, batch=4)
        steps[shard] = router_state(ec.load(fresh, tmp_path / str(shard) / "step-000002"))
    assert steps[True].keys() == replicated.keys()
    for key in steps[False]:
        torch.testing.assert_close(steps[True][key], steps[False][key], atol=1e-7, rtol=1e-6)


def test_submodules_called_from_outside_their_block_are_found():
    from elastic_compile.train.sharding import called_outside_their_block
    model, inputs = ARCHITECTURES["dit"](seed=0, batch=4)   # diffusers DiT: the root calls blocks[0].norm1.emb
    model = ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    with torch.no_grad():
        outside = called_outside_their_block(model, lambda: model(**inputs))
    emb = model.transformer_blocks[0].norm1.emb
    assert emb in outside and outside <= set(emb.modules())
    plain, plain_inputs = ARCHITECTURES["reference_dit"](seed=0, batch=4)
    plain = ec.transform(plain, example_inputs=plain_inputs)
    with torch.no_grad():
        assert called_outside_their_block(plain, lambda: plain(**plain_inputs)) == set()


def test_cli_refuses_shard_base_with_base_fine_tuning_before_any_work(tmp_path, capsys):
    from elastic_compile.cli import main
    assert main(["train", "--shard-base", "--train-base", "--out", str(tmp_path)]) == 1
    assert "--shard-base" in capsys.readouterr().err and not any(tmp_path.iterdir())
