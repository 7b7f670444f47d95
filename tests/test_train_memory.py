"""Training memory: activation checkpointing per block (the same gradients, fewer saved activations) and the frozen
base under autocast with the routers kept in float32."""
import pytest
import torch

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import denoiser_output
from elastic_compile.state import state_of
from elastic_compile.train import train_routers
from train_fixtures import TRAIN_ARGS, router_state, tiny_dataset
from zoo import ARCHITECTURES


def elastic(name="reference_dit", seed=0):
    model, inputs = ARCHITECTURES[name](seed=seed, batch=4)
    model = ec.transform(model, ec.ElasticConfig(width_buckets=(0.25, 0.5, 1.0)), example_inputs=inputs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():   # routers that make mixed decisions, so every head has a gradient
        for router in state_of(model).routers.values():
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def soft_step(model, batch, checkpointing):
    """Router gradients of a distillation-like loss, and the bytes autograd kept for backward."""
    state = state_of(model)
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        target = denoiser_output(model(**batch))
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t
    state.soft, state.soft_checkpoint = True, checkpointing
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = denoiser_output(model(**batch))
        extra = sum(r[1].mean() for r in state.soft_records if r[1] is not None) + \
            sum(r[2][:, 0].mean() for r in state.soft_records if r[2] is not None)
    finally:
        state.soft, state.soft_checkpoint = False, False
    params = [p for r in state.routers.values() for p in r.parameters()]
    for p in params:
        p.grad = None
    ((out - target).pow(2).mean() + 0.1 * extra).backward()
    return [p.grad.clone() for p in params], sum(kept)


@pytest.mark.parametrize("name", ["reference_dit", "dit"])
def test_checkpointed_blocks_give_the_same_router_gradients_and_keep_less(name):
    model = elastic(name)
    batch = ARCHITECTURES[name](seed=3, batch=6)[1]
    plain, plain_bytes = soft_step(model, batch, False)
    checkpointed, checkpointed_bytes = soft_step(model, batch, True)
    assert any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)
    assert checkpointed_bytes < 0.6 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_training_with_activation_checkpointing_trains_the_same_routers():
    a, b = elastic(), elastic()
    args = {**TRAIN_ARGS, "steps": 5}
    ra = train_routers(a, tiny_dataset(size=32), **args)
    rb = train_routers(b, tiny_dataset(size=32), activation_checkpointing=True, **args)
    for key, value in router_state(a).items():
        torch.testing.assert_close(router_state(b)[key], value, atol=1e-6, rtol=1e-5)
    assert rb.final.executed_fraction == pytest.approx(ra.final.executed_fraction, abs=1e-6)
    assert not state_of(b).soft_checkpoint   # switched off after training


def test_bf16_autocast_of_the_base_trains_close_to_float32_with_float32_routers():
    a, b = elastic(), elastic()
    args = {**TRAIN_ARGS, "steps": 8}
    ra = train_routers(a, tiny_dataset(size=32), **args)
    rb = train_routers(b, tiny_dataset(size=32), autocast="bf16", **args)
    assert all(p.dtype == torch.float32 for r in state_of(b).routers.values() for p in r.parameters())
    assert all(p.dtype == torch.float32 for p in b.parameters())   # the base's weights are not converted either
    initial = router_state(elastic())
    moved = max(float((v - initial[k]).abs().max()) for k, v in router_state(a).items())
    differ = max(float((v - router_state(b)[k]).abs().max()) for k, v in router_state(a).items())
    assert 0 < differ < 0.25 * moved, (differ, moved)   # bf16 changes the numbers a little, not the training
    for x, y in zip(ra.history, rb.history):
        assert y.distill_mse == pytest.approx(x.distill_mse, rel=0.1, abs=1e-4)
        assert y.executed_fraction == pytest.approx(x.executed_fraction, abs=0.05)


def test_routers_run_in_float32_under_autocast():
    model = elastic()
    batch = ARCHITECTURES["reference_dit"](seed=3, batch=6)[1]
    state = state_of(model)
    state.soft = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
    finally:
        state.soft = False
    records = [r for r in state.soft_records if r[1] is not None or r[2] is not None]
    assert records and all(t.dtype == torch.float32 for r in records for t in (r[1], r[2]) if t is not None)


def test_unknown_autocast_is_refused():
    with pytest.raises(ConfigError, match="autocast"):
        train_routers(elastic(), tiny_dataset(), autocast="fp8", **TRAIN_ARGS)
