"""Router cost on a DiT-XL-sized block, and one analysis per group of identical blocks."""
import torch
from elastic_compile.analysis.flop_counter import flop_counter

import elastic_compile as ec
from elastic_compile.analysis import blocks as block_analysis
from elastic_compile.models import DiT, dit_config
from elastic_compile.state import state_of


def test_router_within_budget_on_dit_xl_block():
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, in_channels=4, num_classes=1000, **dit_config("XL", depth=1)).eval()
    inputs = dict(x=torch.randn(1, 4, 32, 32), t=torch.tensor([500.0]), y=torch.tensor([3]))
    ec.transform(model, example_inputs=inputs)
    block = model.blocks[0]
    router = state_of(model).routers[0]
    with flop_counter() as counter, torch.no_grad(), ec.force(model, skip=False, width=1.0):
        block(torch.randn(1, 256, 1152), torch.randn(1, 1152))
    block_flops = counter.get_total_flops()
    router_params = sum(p.numel() for p in router.parameters())
    block_params = sum(p.numel() for n, p in block.named_parameters() if not n.startswith("elastic_router."))
    assert router.fc1.out_features == 64
    assert router_params <= 0.01 * block_params
    assert router.flops_per_sample() <= 0.005 * block_flops
    with flop_counter() as counter, torch.no_grad():
        router({"x": torch.randn(1, 256, 1152), "c": torch.randn(1, 1152)})
    assert counter.get_total_flops() == router.flops_per_sample()
    report = ec.report(model).blocks[0]
    assert report.router_params == router_params and report.router_param_fraction <= 0.01


def test_identical_blocks_are_analysed_once(monkeypatch):
    exports = []
    real_export = block_analysis.export_block

    def counting_export(block, *args, **kwargs):
        exports.append(type(block).__name__)
        return real_export(block, *args, **kwargs)
    monkeypatch.setattr(block_analysis, "export_block", counting_export)
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=4, num_classes=10, **dit_config("tiny", depth=6)).eval()
    ec.transform(model, example_inputs=dict(x=torch.randn(2, 4, 8, 8), t=torch.rand(2), y=torch.tensor([0, 10])))
    assert exports == ["DiTBlock"]
    assert len(state_of(model).specs) == 6
