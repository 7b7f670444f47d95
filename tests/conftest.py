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
