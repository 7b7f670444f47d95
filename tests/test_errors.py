"""Typed errors for inputs users can get wrong."""
import pytest
import torch
from torch import nn

import elastic_compile as ec
from elastic_compile.errors import AlreadyElasticError, CaptureError, ConfigError, NoTransformerBlocksError
from zoo import ARCHITECTURES


class ResidualConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualConvBlock(8) for _ in range(3))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("model,inputs", [
    (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), (torch.randn(2, 8),)),
    (SmallCNN(), (torch.randn(2, 3, 8, 8),)),
])
def test_models_without_transformer_blocks_raise_a_typed_error(model, inputs):
    with pytest.raises(NoTransformerBlocksError) as info:
        ec.transform(model, example_inputs=inputs)
    message = str(info.value)
    assert "repeated residual blocks" in message and "token mixing" in message and "pipe.transformer" in message
    assert isinstance(info.value, ec.errors.ElasticCompileError)


def test_small_cnn_rejection_names_the_reason():
    with pytest.raises(NoTransformerBlocksError, match="no token mixing"):
        ec.transform(SmallCNN(), example_inputs=(torch.randn(2, 3, 8, 8),))


def test_bad_inputs_and_configs():
    model, inputs = ARCHITECTURES["reference_dit"]()
    with pytest.raises(CaptureError, match="example_inputs"):
        ec.transform(model, example_inputs=dict(wrong=torch.randn(2)))
    with pytest.raises(ConfigError):
        ec.ElasticConfig(width_buckets=(0.5, 0.25, 1.0))
    with pytest.raises(ConfigError):
        ec.ElasticConfig(width_buckets=(0.25, 0.5))
    with pytest.raises(ConfigError):
        ec.ElasticConfig(threshold=1.5)
    ec.transform(model, example_inputs=inputs)
    with pytest.raises(AlreadyElasticError):
        ec.transform(model, example_inputs=inputs)
    with pytest.raises(ConfigError, match="buckets"):
        with ec.force(model, width=0.3):
            pass
    with pytest.raises(ConfigError):
        with ec.force(model, skip={7}):
            pass
    with pytest.raises(ec.errors.NotElasticError):
        ec.stats(nn.Linear(2, 2))


def test_custom_buckets():
    model, inputs = ARCHITECTURES["dit"]()
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    with torch.no_grad(), ec.force(model, width=0.5, skip=False):
        model(**inputs)
    assert all(d.width == 0.5 for block in ec.stats(model).decisions for d in block)
