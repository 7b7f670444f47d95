"""diffusers' save_pretrained / from_pretrained on an elastic model (issue 25, item 4): the round trip keeps
everything, and a base model whose neurons are already reordered is recognised, not reordered twice."""
import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel

import elastic_compile as ec
from elastic_compile.errors import ArtifactError, ModelMismatchError
from elastic_compile.report import model_fingerprint
from elastic_compile.state import ROUTER_ATTRIBUTE, state_of
from helpers import randomize_routers
from zoo import ARCHITECTURES, first_output


def _elastic(seed=0):
    base, inputs = ARCHITECTURES["dit"](seed=seed, batch=4)
    original = copy.deepcopy(base)
    model = ec.transform(base, example_inputs=inputs)
    randomize_routers(model, seed=3)
    return model, original, inputs


def _outputs(model, inputs):
    """Outputs under the routers' own decisions and under a forced narrow width, with the decisions."""
    with torch.no_grad():
        routed = first_output(model(**inputs))
        decisions = ec.stats(model).decisions
        with ec.force(model, skip=False, width=0.5):
            narrow = first_output(model(**inputs))
    return routed, narrow, decisions


def test_save_pretrained_round_trip_keeps_everything(tmp_path):
    model, original, inputs = _elastic()
    routed, narrow, decisions = _outputs(model, inputs)
    model.save_pretrained(tmp_path / "m")
    # the elastic model is unchanged by saving
    again = _outputs(model, inputs)
    assert torch.equal(again[0], routed) and torch.equal(again[1], narrow)
    # diffusers' own from_pretrained: exactly the base model the elastic one was made from, no router keys
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "m")
    expected = original.state_dict()
    assert set(plain.state_dict()) == set(expected)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.items())
    # the elastic model back: same outputs, decisions and narrow widths
    loaded = ec.from_pretrained(DiTTransformer2DModel, tmp_path / "m")
    got = _outputs(loaded, inputs)
    assert torch.equal(got[0], routed) and torch.equal(got[1], narrow) and got[2] == decisions
    # and a second save into the same folder replaces both
    loaded.save_pretrained(tmp_path / "m")
    assert torch.equal(_outputs(ec.from_pretrained(DiTTransformer2DModel, tmp_path / "m"), inputs)[1], narrow)


def test_from_pretrained_without_an_artifact_is_a_typed_error(tmp_path):
    base, _ = ARCHITECTURES["dit"](seed=0)
    base.save_pretrained(tmp_path / "plain")  # a plain model: diffusers' method, untouched
    with pytest.raises(ArtifactError, match="elastic"):
        ec.from_pretrained(DiTTransformer2DModel, tmp_path / "plain")


def test_a_base_already_in_the_artifacts_order_is_not_reordered_twice(tmp_path):
    """The weights of an elastic model written as they are (what a plain state-dict save does) and loaded into
    a fresh model: ``load`` recognises the order from the fingerprint and leaves it."""
    model, original, inputs = _elastic()
    routed, narrow, decisions = _outputs(model, inputs)
    ec.save(model, tmp_path / "a")
    permuted, _ = ARCHITECTURES["dit"](seed=5)
    permuted.load_state_dict({k: v for k, v in model.state_dict().items() if f"{ROUTER_ATTRIBUTE}." not in k})
    assert model_fingerprint(permuted) != model_fingerprint(original)  # the order is seen
    loaded = ec.load(permuted, tmp_path / "a")
    got = _outputs(loaded, inputs)
    assert torch.equal(got[1], narrow) and torch.equal(got[0], routed) and got[2] == decisions
    # the original base still loads as before; other weights are still refused
    assert torch.equal(_outputs(ec.load(copy.deepcopy(original), tmp_path / "a"), inputs)[1], narrow)
    other, _ = ARCHITECTURES["dit"](seed=7)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        ec.load(other, tmp_path / "a")


def test_fingerprint_sees_the_order_of_values_and_reads_older_artifacts(tmp_path):
    base, _ = ARCHITECTURES["dit"](seed=0)
    swapped = copy.deepcopy(base)
    with torch.no_grad():
        bias = swapped.transformer_blocks[0].ff.net[2].bias
        bias.copy_(bias.flip(0))
    assert model_fingerprint(swapped) != model_fingerprint(base)
    assert model_fingerprint(swapped, ordered=False) == model_fingerprint(base, ordered=False)
    # an artifact written before fingerprints saw order (sorted values) still loads and saves the new kind
    from elastic_compile.artifact.files import read_manifest_json, write_json_atomic
    from elastic_compile.artifact.integrity import SEAL
    model, original, inputs = _elastic()
    narrow = _outputs(model, inputs)[1]
    ec.save(model, tmp_path / "old")
    manifest = read_manifest_json(tmp_path / "old" / "elastic.json", "elastic_compile.artifact/1", "x", "y")
    manifest["fingerprint"] = model_fingerprint(original, ordered=False)
    for key in ("fingerprint_order", "permuted_fingerprint"):
        manifest.pop(key)
    manifest.pop(SEAL)
    write_json_atomic(tmp_path / "old" / "elastic.json", manifest)
    loaded = ec.load(copy.deepcopy(original), tmp_path / "old")
    assert torch.equal(_outputs(loaded, inputs)[1], narrow)
    assert state_of(loaded).fingerprint == model_fingerprint(original)
