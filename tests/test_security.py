"""What a hostile or careless user can do with files and options: nothing runs code from data, nothing of the
user's is deleted, every artifact byte and value is checked, and every failure is a typed error naming the file."""
import json
import os
import pickle
import shutil
import sys

import pytest
import torch

import elastic_compile as ec
from elastic_compile.cli import main
from elastic_compile.cli.common import load_tensor_file
from elastic_compile.errors import (ArtifactError, ConfigError, DestinationError, ElasticCompileError,
                                    InputMismatchError, ModelMismatchError)
from elastic_compile.state import state_of
from elastic_compile.train import TrajectoryDataset
from helpers import randomize_routers
from security_helpers import rewrite_manifest, saved_artifact
from zoo import ARCHITECTURES

HERE = os.path.dirname(__file__)


class _RunsCode:
    """Unpickling this touches a marker file: what a crafted ``--inputs`` / ``--data`` file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "inputs.pt"
    with open(path, "wb") as handle:
        pickle.dump({"x": _RunsCode(marker)}, handle)
    return path, marker


# 1. no code from data ---------------------------------------------------------------------------------------------
def test_pickled_inputs_and_datasets_are_refused_without_running_them(crafted, capsys, monkeypatch):
    path, marker = crafted
    monkeypatch.syspath_prepend(HERE)
    assert main(["inspect", "--model", "fixtures.factories:tiny_dit", "--inputs", str(path)]) == 1
    assert main(["train", "--data", str(path), "--out", str(path.parent / "run")]) == 1
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "weights_only" in err and str(path) in err and "unpickle" in err


def test_tensor_files_load_as_safetensors_or_plain_torch_save(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.ones(2, 3)}, str(tmp_path / "a.safetensors"),
              metadata={"elastic_compile.constants": json.dumps({"return_dict": False})})
    loaded = load_tensor_file(str(tmp_path / "a.safetensors"), "--inputs")
    assert loaded["return_dict"] is False and torch.equal(loaded["x"], torch.ones(2, 3))
    torch.save({"x": torch.zeros(1), "flag": True}, tmp_path / "b.pt")
    assert load_tensor_file(str(tmp_path / "b.pt"), "--inputs")["flag"] is True
    for bad in ("missing.pt", "a.safetensors.trunc"):
        (tmp_path / "a.safetensors.trunc").write_bytes((tmp_path / "a.safetensors").read_bytes()[:20])
        with pytest.raises(ConfigError, match="--inputs"):
            load_tensor_file(str(tmp_path / bad), "--inputs")


def test_trajectory_datasets_round_trip_through_safetensors(tmp_path):
    data = TrajectoryDataset({"x": torch.randn(5, 2), "t": torch.arange(5.0)}, {"return_dict": False, "c": torch.ones(3)},
                             torch.tensor([-1, 0, 1, -1, 3]))
    data.save(tmp_path / "d.safetensors")
    back = TrajectoryDataset.load(tmp_path / "d.safetensors")
    assert torch.equal(back.rows["x"], data.rows["x"]) and torch.equal(back.previous, data.previous)
    assert back.shared["return_dict"] is False and torch.equal(back.shared["c"], torch.ones(3))
    (tmp_path / "e.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match="e.safetensors"):
        TrajectoryDataset.load(tmp_path / "e.safetensors")


def test_a_factory_named_by_an_artifact_is_never_imported(tiny_export, tmp_path, capsys):
    out, _, _ = tiny_export
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    base = {"kind": "factory", "factory": "fixtures.marker_factory:build", "path": "base", "class": "DiT"}
    rewrite_manifest(copy, "manifest.json", lambda m: m["source"].update(base=base))
    with pytest.raises(ConfigError, match="fixtures.marker_factory:build"):
        ec.runtime.load(copy)
    assert main(["run", str(copy), "--classes", "1", "--out", str(tmp_path / "g.png")]) == 1
    assert "--model fixtures.marker_factory:build" in capsys.readouterr().err
    assert "fixtures.marker_factory" not in sys.modules


def test_the_user_names_the_architecture_of_a_factory_export(tiny_export, tmp_path):
    out, model, inputs = tiny_export
    fresh, _ = ARCHITECTURES["dit"](seed=5, batch=2)  # other weights: replaced by the export's
    runtime = ec.runtime.load(out, threads=1, base_model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(runtime(**inputs)[0], model(**inputs)[0], atol=1e-4, rtol=0)
    wrong, _ = ARCHITECTURES["reference_dit"]()
    with pytest.raises(ModelMismatchError, match="base weights"):
        ec.runtime.load(out, base_model=wrong)
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        ec.runtime.load(out, base_factory="os:getcwd")


# 2. nothing of the user's deleted ----------------------------------------------------------------------------------
def test_save_refuses_a_users_directory_and_never_touches_a_file(tmp_path):
    base, inputs, model = saved_artifact(tmp_path / "artifact")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    with pytest.raises(DestinationError, match="important.txt"):
        ec.save(model, mine)
    assert (mine / "important.txt").read_text() == "keep me"
    (tmp_path / "artifact" / "notes.txt").write_text("mine too")  # a user's file inside a previous artifact
    with pytest.raises(DestinationError, match="notes.txt"):
        ec.save(model, tmp_path / "artifact")
    file = tmp_path / "file.bin"
    file.write_bytes(b"data")
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match="a file"):
            ec.save(model, file, overwrite=overwrite)
    assert file.read_bytes() == b"data"
    with pytest.raises(DestinationError, match="writable"):
        ec.save(model, file / "inside")
    os.symlink(mine, tmp_path / "link")
    with pytest.raises(DestinationError, match="a link"):
        ec.save(model, tmp_path / "link", overwrite=True)
    ec.save(model, tmp_path / "fresh")
    ec.save(model, tmp_path / "fresh")  # a previous artifact is replaced without asking
    ec.save(model, mine, overwrite=True)  # asked for: replaced
    assert sorted(p.name for p in mine.iterdir()) == ["elastic.json", "permutations.safetensors", "routers.safetensors"]


def test_export_and_its_cli_refuse_a_users_directory(tiny_export, tmp_path, capsys):
    _, model, inputs = tiny_export
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    with pytest.raises(DestinationError, match="overwrite"):
        ec.export(model, inputs, mine, buckets=[1.0], batch_sizes=[2])
    code = main(["export", "--model", "fixtures.factories:tiny_dit", "--out", str(mine), "--buckets", "1",
                 "--no-verify-runtime", "--no-outside-graphs"])
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["important.txt"] and sorted(os.listdir(tmp_path)) == ["mine"]


# 4. integrity ------------------------------------------------------------------------------------------------------
def _fresh(base):
    import copy
    return copy.deepcopy(base)


@pytest.mark.parametrize("edit,error,match", [
    (lambda m: m["files"].update({"routers.safetensors": "0" * 64}), ArtifactError, "elastic.json"),
    (lambda m: m.pop("files"), ArtifactError, "elastic.json"),
    (lambda m: m["config"].update(threshold=0.9), ArtifactError, "edited"),
], ids=["edited-hash", "deleted-files", "edited-value"])
def test_an_edited_save_manifest_is_refused(tmp_path, edit, error, match):
    base, _, _ = saved_artifact(tmp_path / "a")
    rewrite_manifest(tmp_path / "a", "elastic.json", edit, rehash=False, keep_seal=True)
    with pytest.raises(error, match=match):
        ec.load(_fresh(base), tmp_path / "a")


def test_corrupt_files_and_bad_values_are_refused_even_with_matching_hashes(tmp_path):
    from safetensors.torch import load_file, save_file
    base, _, _ = saved_artifact(tmp_path / "a")
    routers = tmp_path / "a" / "routers.safetensors"
    routers.write_bytes(os.urandom(routers.stat().st_size))
    with pytest.raises(ArtifactError, match="routers.safetensors"):
        ec.load(_fresh(base), tmp_path / "a")  # hash mismatch
    rewrite_manifest(tmp_path / "a", "elastic.json")
    with pytest.raises(ArtifactError, match="safetensors file at .*routers.safetensors"):
        ec.load(_fresh(base), tmp_path / "a")  # hashes made to match: the file itself is refused
    saved_artifact(tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / "permutations.safetensors"))
    key = next(iter(tensors))
    tensors[key][1] = tensors[key][0]
    save_file(tensors, str(tmp_path / "b" / "permutations.safetensors"))
    rewrite_manifest(tmp_path / "b", "elastic.json")
    with pytest.raises(ArtifactError, match=f"permutation {key}.*once"):
        ec.load(_fresh(base), tmp_path / "b")
    saved_artifact(tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / "routers.safetensors"))
    tensors[next(iter(tensors))].fill_(float("nan"))
    save_file(tensors, str(tmp_path / "c" / "routers.safetensors"))
    rewrite_manifest(tmp_path / "c", "elastic.json")
    with pytest.raises(ArtifactError, match="finite"):
        ec.load(_fresh(base), tmp_path / "c")
    saved_artifact(tmp_path / "d")
    rewrite_manifest(tmp_path / "d", "elastic.json", lambda m: m["versions"].update(elastic_compile="99.0"))
    with pytest.raises(ArtifactError, match="Upgrade"):
        ec.load(_fresh(base), tmp_path / "d")
    model = _fresh(base)
    with pytest.raises(ArtifactError):
        ec.load(model, tmp_path / "c")
    assert not hasattr(model, "_elastic_state") and all(not n.startswith("elastic") for n, _ in model.named_children())


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(opset=99), "opset"),
    (lambda m: m.update(batch_sizes=[5]), "graph per batch size"),
    (lambda m: m.update(dtype="fp8"), "dtype"),
    (lambda m: m["blocks"][0]["layout"]["leaves"][0].update(dtype="floaty"), "dtype"),
    (lambda m: m["blocks"][0]["graphs"]["1"].update({"2": "../../escape.onnx"}), "relative path"),
    (lambda m: m["routers"][0].update(block=7), "routers"),
    (lambda m: m["versions"].update(elastic_compile="2.0"), "Upgrade"),
    (lambda m: m.pop("blocks"), "blocks"),
    ("[]", "JSON object"),
    ("null", "JSON object"),
    ('{"format": ', "valid JSON"),
], ids=["opset", "batch-sizes", "dtype", "leaf-dtype", "path", "router-index", "version", "missing", "list", "null",
        "truncated"])
def test_export_manifest_values_are_checked(tiny_export, tmp_path, edit, match):
    out, _, _ = tiny_export
    shutil.copytree(out, tmp_path / "x")
    if isinstance(edit, str):
        (tmp_path / "x" / "manifest.json").write_text(edit)
    else:
        rewrite_manifest(tmp_path / "x", "manifest.json", edit)
    with pytest.raises(ArtifactError, match=match) as info:
        ec.runtime.load(tmp_path / "x")
    assert "manifest.json" in str(info.value)


def test_export_files_added_or_linked_are_refused(tiny_export, tmp_path):
    out, _, _ = tiny_export
    shutil.copytree(out, tmp_path / "x")
    (tmp_path / "x" / "base" / "extra.bin").write_bytes(b"\0")
    with pytest.raises(ArtifactError, match="not listed"):
        ec.runtime.load(tmp_path / "x")


def test_strict_false_still_requires_the_architecture(tmp_path):
    """A deeper model would keep its extra blocks plain, a wider one fail on its first call: both are refused at
    load, by the architecture's hash and, for artifacts without one, by each FFN's unit count."""
    from elastic_compile.models import DiT, dit_config
    saved_artifact(tmp_path / "a")
    deeper = DiT(input_size=8, in_channels=4, num_classes=10, **dit_config("tiny", depth=4))
    wider = DiT(input_size=8, in_channels=4, num_classes=10, mlp_ratio=8.0, **dit_config("tiny", depth=3))
    for other in (deeper, wider):
        with pytest.raises(ModelMismatchError, match="architecture"):
            ec.load(other, tmp_path / "a", strict=False)
    rewrite_manifest(tmp_path / "a", "elastic.json", lambda m: m.pop("structure"))
    with pytest.raises(ModelMismatchError, match="units"):
        ec.load(wider, tmp_path / "a", strict=False)


# 5. typed errors and checked options -------------------------------------------------------------------------------
def test_a_meta_device_model_and_bad_config_values_are_config_errors():
    with torch.device("meta"):
        model, inputs = ARCHITECTURES["reference_dit"]()
    with pytest.raises(ConfigError, match="meta"):
        ec.transform(model, example_inputs=inputs)
    for bad in (dict(verify_atol=float("nan")), dict(allow_skip="no"), dict(width_buckets=(0.5, "1")),
                dict(router_hidden=10 ** 9)):
        with pytest.raises(ConfigError):
            ec.ElasticConfig(**bad)


def test_a_single_timestep_for_a_batch_broadcasts_like_the_dense_model():
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    one = dict(inputs, t=inputs["t"][:1])
    with torch.no_grad():
        expected = model(**dict(one, t=one["t"].expand(2)))
        decisions = ec.stats(model).decisions
        torch.testing.assert_close(model(**one), expected)
    assert ec.stats(model).decisions == decisions
    router = state_of(model).routers[0]
    shapes = {"pooled": (4,), "vector": (), "scalar": None}
    arguments = {f.name: torch.randn(2 + k, *shapes[f.kind], f.dim) if shapes[f.kind] is not None else
                 torch.rand(2 + k) for k, f in enumerate(router.features)}
    assert len(arguments) > 1
    with pytest.raises(InputMismatchError, match="rows"), torch.no_grad():
        router.logits(arguments)


@pytest.mark.parametrize("routers", ["host", "onnx"])
def test_a_single_timestep_for_a_batch_on_a_runtime_works_or_is_a_typed_error(tiny_export, routers):
    out, model, inputs = tiny_export
    one = dict(inputs, timestep=inputs["timestep"][:1])
    runtime = ec.runtime.load(out, threads=1, routers=routers)
    try:
        got = runtime(**one)[0]
    except InputMismatchError:
        return
    with torch.no_grad():
        torch.testing.assert_close(got, model(**one)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv,match", [
    (["run", "A", "--classes", "1", "--nrow", "-1"], "--nrow"),
    (["run", "A", "--classes", "1.7"], "--classes"),
    (["run", "A", "--classes", "1", "--guidance", "nan"], "--guidance"),
    (["run", "A", "--classes", "1", "--threads", "-1"], "--threads"),
    (["run", "A", "--classes", "1", "--device", "nonsense"], "--device"),
    (["run", "A", "--classes", "1", "--out", "{tmp}/file/g.png"], "--out"),
    (["train", "--steps", "0", "--out", "{tmp}/r"], "steps"),
    (["train", "--budget", "2.0", "--out", "{tmp}/r"], "budget"),
    (["train", "--data", "{tmp}/missing.pt", "--out", "{tmp}/r"], "no such file"),
    (["inspect", "--model", "os:getcwd"], "torch.nn.Module"),
    (["export", "--model", "fixtures.factories:tiny_dit", "--out", "{tmp}/e", "--batch-sizes", "1.7"], "batch-sizes"),
])
def test_bad_cli_values_fail_fast_with_exit_code_1(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    (tmp_path / "file").write_text("a file, not a folder")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_typed_error(capsys):
    assert main(["run", "A", "--classes", "1", "--device", "cuda"]) == 1
    assert "CUDA" in capsys.readouterr().err


def test_every_error_raised_on_purpose_is_an_elastic_compile_error():
    import elastic_compile.errors as errors
    typed = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(e, ElasticCompileError) for e in typed if e.__module__ == errors.__name__)
