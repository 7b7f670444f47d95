import torch

from elastic_compile.runtime.state import state_of


def randomize_routers(model, seed=0, scale=3.0):
    """Give every router random output weights, so decisions differ between samples."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc1.weight.copy_(torch.randn(router.fc1.weight.shape, generator=generator))
            router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=generator) * scale)
            router.fc2.bias.copy_(torch.randn(router.fc2.bias.shape, generator=generator))


def sample_inputs(inputs, index, batch):
    """The inputs of one sample of a batch (tensors with the batch as leading dim; per-sample lists)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[index:index + 1]
        elif isinstance(value, list) and len(value) == batch:
            out[key] = value[index:index + 1]
        else:
            out[key] = value
    return out
