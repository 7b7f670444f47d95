"""A rank of a 2-process gloo recording into a trajectory store (tests/test_train_store.py): each rank records
its share of the class-conditional generations; rank 0 writes the index."""
import os
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from elastic_compile.train import record_class_conditional_trajectories  # noqa: E402


def record(rank: int, directory: str) -> None:
    from test_train_store import CONFIG, sampler_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        store = record_class_conditional_trajectories(sampler_model(), FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                      samples_per_class=1, batch_size=4, out=f"{directory}/store",
                                                      shard_mb=0.001)
        assert len(store) == 10 * 2 * CONFIG.num_inference_steps
    finally:
        dist.destroy_process_group()
