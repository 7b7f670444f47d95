"""A tiny elastic model and dataset for router-training tests (also used by the torchrun script)."""
import torch

import elastic_compile as ec
from elastic_compile.train import TrajectoryDataset
from zoo import ARCHITECTURES


def tiny_elastic_model():
    model, inputs = ARCHITECTURES["reference_dit"](seed=0, batch=4)
    return ec.transform(model, example_inputs=inputs)


def tiny_dataset(size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrajectoryDataset({"x": torch.randn(size, 4, 8, 8, generator=g), "t": torch.rand(size, generator=g) * 1000,
                              "y": torch.randint(0, 11, (size,), generator=g)}, {})


def router_state(model):
    from elastic_compile.state import state_of
    return {f"{i}.{k}": v.detach().clone() for i, r in state_of(model).routers.items() for k, v in r.state_dict().items()}


TRAIN_ARGS = dict(budget=0.5, steps=12, batch_size=16, lr=3e-3, seed=0, log_every=4, progress=False)
