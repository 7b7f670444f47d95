"""save -> load round trips, integrity checks, and atomic writes."""
import json

import pytest
import torch

import elastic_compile as ec
from elastic_compile.errors import AlreadyElasticError, ArtifactError, ModelMismatchError
from helpers import randomize_routers
from zoo import ARCHITECTURES, first_output


@pytest.mark.parametrize("name", ["reference_dit", "flux", "sana", "hunyuan_dit"])
def test_round_trip_on_fresh_base_model_gives_identical_outputs_and_decisions(name, tmp_path):
    model, inputs = ARCHITECTURES[name](seed=0, batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=2)
    with torch.no_grad():
        expected = first_output(model(**inputs))
    expected_decisions = ec.stats(model).decisions
    ec.save(model, tmp_path / "artifact")

    fresh, _ = ARCHITECTURES[name](seed=0, batch=4)
    loaded = ec.load(fresh, tmp_path / "artifact")
    with torch.no_grad():
        got = first_output(loaded(**inputs))
    assert torch.equal(got, expected)
    assert ec.stats(loaded).decisions == expected_decisions
    assert str(ec.report(loaded)) == str(ec.report(model))


def test_load_checks_the_base_model(tmp_path):
    model, inputs = ARCHITECTURES["reference_dit"](seed=0)
    ec.transform(model, example_inputs=inputs)
    ec.save(model, tmp_path / "a")
    other, _ = ARCHITECTURES["reference_dit"](seed=1)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        ec.load(other, tmp_path / "a")
    ec.load(other, tmp_path / "a", strict=False)  # other weights accepted on request; still function-preserving
    with pytest.raises(AlreadyElasticError):
        ec.load(model, tmp_path / "a")
    wrong, _ = ARCHITECTURES["dit"](seed=0)
    with pytest.raises(ModelMismatchError):
        ec.load(wrong, tmp_path / "a", strict=False)


def test_corrupt_or_partial_artifacts_are_refused(tmp_path):
    model, inputs = ARCHITECTURES["reference_dit"](seed=0)
    ec.transform(model, example_inputs=inputs)
    path = ec.save(model, tmp_path / "a")
    (path / "routers.safetensors").unlink()
    with pytest.raises(ArtifactError, match="routers.safetensors"):
        ec.load(ARCHITECTURES["reference_dit"](seed=0)[0], path)
    with pytest.raises(ArtifactError):
        ec.load(ARCHITECTURES["reference_dit"](seed=0)[0], tmp_path / "missing")
    path = ec.save(model, tmp_path / "b")
    manifest = json.loads((path / "elastic.json").read_text())
    manifest["format"] = "something/else"
    (path / "elastic.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format"):
        ec.load(ARCHITECTURES["reference_dit"](seed=0)[0], path)


def test_failed_save_leaves_previous_artifact_intact(tmp_path, monkeypatch):
    model, inputs = ARCHITECTURES["reference_dit"](seed=0)
    ec.transform(model, example_inputs=inputs)
    path = ec.save(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("elastic_compile.serialization.save_file", broken)
    with pytest.raises(OSError):
        ec.save(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
