"""A rank of a 2-process gloo run (torch.multiprocessing spawn) for tests/test_train_resume.py: trains the tiny
model's routers uninterrupted, then again killed after step 6 (every rank raises) and resumed with a fresh model;
rank 0 saves both results."""
import os
import sys

import torch
from safetensors.torch import save_file
from torch import distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from elastic_compile.train import train_routers  # noqa: E402
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset, tiny_elastic_model  # noqa: E402


class Killed(Exception):
    pass


class KillAt:
    """A task loss that adds exactly zero and raises at training step ``at`` (None: never): a kill mid-interval."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0

    def __call__(self, model, inputs):
        self.calls += 1
        if self.calls == self.at:
            raise Killed()
        return torch.zeros(())


def run(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        args = {**TRAIN_ARGS, "checkpoint_every": 4}
        whole = tiny_elastic_model()
        train_routers(whole, tiny_dataset(), checkpoint_dir=f"{directory}/whole", task_loss=KillAt(), **args)
        try:
            train_routers(tiny_elastic_model(), tiny_dataset(), checkpoint_dir=f"{directory}/cut",
                          task_loss=KillAt(6), **args)
            raise AssertionError("the run was not killed")
        except Killed:
            pass
        resumed = tiny_elastic_model()
        report = train_routers(resumed, tiny_dataset(), checkpoint_dir=f"{directory}/cut", task_loss=KillAt(),
                               resume=True, **args)
        if rank == 0:
            save_file(router_state(whole), f"{directory}/whole.safetensors")
            save_file(router_state(resumed), f"{directory}/resumed.safetensors")
            assert report.world_size == 2 and [e.step for e in report.history] == [1, 4, 8, 12]
    finally:
        dist.destroy_process_group()
