"""A rank of a 2-process gloo run (torch.multiprocessing spawn) for tests/test_train_shard.py: trains the tiny
model's routers with DDP, then with the base sharded by FSDP2 (``shard_base=True``, checking during training that
each rank holds only its shard and that every projection runs on gathered weights), then sharded again killed
after step 6 and resumed with activation checkpointing; rank 0 saves the routers, outputs and checks."""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(__file__))

from elastic_compile.train import train_routers  # noqa: E402
from elastic_compile.train.sharding import gated_blocks  # noqa: E402
from resume_worker import KillAt, Killed  # noqa: E402
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset, tiny_elastic_model  # noqa: E402

ARGS = {**TRAIN_ARGS, "checkpoint_every": 4}


class ShardProbe:
    """A task loss adding exactly zero that records, mid-training (between forward and backward), how much of each
    block's base this rank holds; and forward pre-hooks recording whether any projection ran on a sharded weight."""

    def __init__(self, model: nn.Module, rank: int):
        self.rank, self.local, self.full, self.calls, self.sharded_uses, self.uses = rank, 0, 0, 0, 0, 0
        self.not_dtensor = []
        for block in gated_blocks(model):
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear) and "elastic_router" not in name:
                    module.register_forward_pre_hook(self.used)

    def used(self, module, args):
        self.uses += 1
        self.sharded_uses += isinstance(module.weight, DTensor)

    def __call__(self, model, inputs):
        self.calls += 1
        for block in gated_blocks(model):
            for name, p in block.named_parameters():
                if "elastic_router" in name:
                    continue
                if not isinstance(p, DTensor):
                    self.not_dtensor.append(name)
                    continue
                rows = len(torch.arange(p.shape[0]).chunk(2)[self.rank]) if p.shape[0] > 1 else p.shape[0] * (1 - self.rank)
                assert p.to_local().shape[0] == rows, (name, p.to_local().shape, p.shape)
                self.local += p.to_local().numel()
                self.full += p.numel()
        return torch.zeros(())


def run(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        probe = tiny_dataset(size=8, seed=5).batch(torch.arange(8))
        ddp = tiny_elastic_model()
        train_routers(ddp, tiny_dataset(), **TRAIN_ARGS)
        sharded = tiny_elastic_model()
        base_before = {n: p.detach().clone() for n, p in sharded.named_parameters() if "elastic_router" not in n}
        check = ShardProbe(sharded, rank)
        train_routers(sharded, tiny_dataset(), checkpoint_dir=f"{directory}/whole", task_loss=check, shard_base=True,
                      **ARGS)
        trained = router_state(sharded)
        # the model leaves training whole and plain: its own class, ordinary parameters, the base untouched
        assert type(sharded).__name__ == "DiT" and not any(isinstance(p, DTensor) for p in sharded.parameters())
        assert all(torch.equal(p, base_before[n]) for n, p in sharded.named_parameters() if n in base_before)
        try:
            train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=f"{directory}/cut",
                          task_loss=KillAt(6), shard_base=True, **ARGS)
            raise AssertionError("the run was not killed")
        except Killed:
            pass
        resumed = tiny_elastic_model()
        train_routers(resumed, tiny_dataset(), checkpoint_dir=f"{directory}/cut", task_loss=KillAt(), resume=True,
                      shard_base=True, activation_checkpointing=True, **ARGS)
        with torch.no_grad():
            outputs = {"ddp": ddp(**probe), "sharded": sharded(**probe)}
        sharded.load_state_dict(sharded.state_dict())   # no FSDP state-dict hooks left behind
        train_routers(sharded, tiny_dataset(), shard_base=True, **{**TRAIN_ARGS, "steps": 2})   # shardable again
        if rank == 0:
            save_file(router_state(ddp), f"{directory}/ddp.safetensors")
            save_file(trained, f"{directory}/sharded.safetensors")
            save_file(router_state(resumed), f"{directory}/resumed.safetensors")
            save_file(outputs, f"{directory}/outputs.safetensors")
            with open(f"{directory}/checks.json", "w") as handle:
                json.dump({"calls": check.calls, "local": check.local, "full": check.full, "uses": check.uses,
                           "sharded_uses": check.sharded_uses, "not_dtensor": check.not_dtensor}, handle)
    finally:
        dist.destroy_process_group()


def run_rollouts(rank: int, directory: str) -> None:
    """Rollout training (the feature cache in the loop, every block called once per sampling step before one
    backward), replicated and then with the base sharded; rank 0 saves both routers."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import elastic_compile as ec
    from elastic_compile.sampling import SamplingConfig
    from elastic_compile.train import ClassConditionalRollout
    from zoo import ARCHITECTURES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        config = SamplingConfig(num_inference_steps=4, guidance_scale=2.0, sample_size=8, in_channels=4,
                                num_classes=10, null_class=10)
        rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), config, per_class=1)
        args = dict(objective="rollout", budget=0.5, steps=3, batch_size=4, lr=3e-3, seed=0, log_every=1,
                    progress=False, calibrate=False, dual_init=1.0, dual_step=5.0)
        models = {}
        for shard in (False, True):
            model, inputs = ARCHITECTURES["dit"](seed=0, batch=4)
            models[shard] = ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
            train_routers(models[shard], rollout, shard_base=shard, checkpoint_dir=f"{directory}/{shard}",
                          checkpoint_every=2, **args)
            assert not any(isinstance(p, DTensor) for p in models[shard].parameters())
        if rank == 0:
            save_file(router_state(models[False]), f"{directory}/replicated.safetensors")
            save_file(router_state(models[True]), f"{directory}/sharded.safetensors")
    finally:
        dist.destroy_process_group()
