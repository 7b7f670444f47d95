import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from zoo import ARCHITECTURES  # noqa: E402


class Transformed:
    """An architecture's original model (untouched copy), its elastic version and its example inputs."""

    def __init__(self, name):
        import elastic_compile as ec
        self.name = name
        model, self.inputs = ARCHITECTURES[name]()
        self.original = copy.deepcopy(model)
        self.model = ec.transform(model, example_inputs=self.inputs)


_cache = {}


@pytest.fixture(params=sorted(ARCHITECTURES))
def transformed(request):
    if request.param not in _cache:
        _cache[request.param] = Transformed(request.param)
    return _cache[request.param]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A small ONNX Runtime export of a diffusers DiT (widths 1/2 and 1, batch 2, the ops outside the blocks as
    graphs), shared by the tests that tamper with copies of it: ``(directory, elastic model, inputs)``."""
    import elastic_compile as ec
    from helpers import randomize_routers
    model, inputs = ARCHITECTURES["dit"](seed=0, batch=2)
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    randomize_routers(model, seed=1)
    out = tmp_path_factory.mktemp("tiny_export") / "export"
    ec.export(model, inputs, out, batch_sizes=[2], threads=1, verify_runtime=False)
    return out, model, inputs
