"""Run under torchrun: trains the tiny model's routers and saves them from rank 0 (tests/test_train.py)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from torch import distributed as dist  # noqa: E402

from elastic_compile.train import train_routers  # noqa: E402
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset, tiny_elastic_model  # noqa: E402

model = tiny_elastic_model()
report = train_routers(model, tiny_dataset(), **TRAIN_ARGS)
if dist.get_rank() == 0:
    save_file(router_state(model), sys.argv[1])
    print("world", report.world_size, "final", report.final)
dist.destroy_process_group()
