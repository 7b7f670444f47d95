"""ec.export: files, manifest, atomic writes, dtypes, base model rebuilt from the artifact, CLI export."""
import json
import shutil

import onnx
import pytest
import torch

import elastic_compile as ec
from elastic_compile.cli import main
from elastic_compile.errors import ArtifactError, BucketNotExportedError, ConfigError
from elastic_compile.export import exporter
from elastic_compile.artifact.commit import staging_directory
from elastic_compile.artifact.manifest import FORMAT, read_manifest, sha256_file
from elastic_compile.state import state_of
from zoo import ARCHITECTURES, first_output


@pytest.fixture(scope="module")
def exported_dit(tmp_path_factory):
    model, inputs = ARCHITECTURES["dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    out = tmp_path_factory.mktemp("export") / "dit"
    ec.export(model, inputs, out, threads=1)
    return model, inputs, out


def test_manifest_records_source_shapes_buckets_files_and_versions(exported_dit):
    model, inputs, out = exported_dit
    state = state_of(model)
    manifest = read_manifest(out)  # also checks every file against its sha256
    assert manifest["format"] == FORMAT and manifest["opset"] >= 19
    assert manifest["source"]["fingerprint"] == state.fingerprint
    assert manifest["source"]["base"]["kind"] == "diffusers"
    assert manifest["buckets"] == list(state.config.width_buckets) and manifest["batch_sizes"] == [1, 4]
    assert manifest["inputs"]["hidden_states"] == {"shape": [4, 4, 8, 8], "dtype": "float32"}
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "elastic_compile"} <= set(manifest["versions"])
    assert manifest["backends"]["onnxruntime"]["verified"] and manifest["verification"]["max_abs_diff"] < 1e-4
    assert {"pos_embed", "proj_out_1", "proj_out_2"} <= set(manifest["runs_in_torch"]["modules"])
    # diffusers' DiT reads transformer_blocks[0].norm1.emb outside the blocks: those weights stay in torch.
    assert any(n.startswith("transformer_blocks.0.norm1.emb.") for n in
               manifest["runs_in_torch"]["block_parameters_used_outside"])
    assert manifest["files"] and all(sha256_file(out / f) == h for f, h in manifest["files"].items())
    assert len(manifest["routers"]) == len(state.routers)


def test_every_graph_is_checked_static_and_shares_its_blocks_weight_file(exported_dit):
    model, inputs, out = exported_dit
    manifest = read_manifest(out)
    for block in manifest["blocks"]:
        assert sorted(block["graphs"]) == ["0", "1", "2", "3"]
        for bucket, sizes in block["graphs"].items():
            for size, file in sizes.items():
                onnx.checker.check_model(str(out / file), full_check=True)
                graph = onnx.load(str(out / file), load_external_data=False)
                assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 19
                dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
                assert all(all(v > 0 for v in shape) for shape in dims)  # static shapes
                assert dims[0][0] == int(size)
                external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
                locations = {e.value for i in external for e in i.external_data if e.key == "location"}
                assert external and locations == {"weights.bin"}
        assert (out / block["weights"]).stat().st_size > 0
    for router in manifest["routers"]:
        onnx.checker.check_model(str(out / router["file"]), full_check=True)


def test_default_batch_sizes_serve_any_batch_by_chunks_and_padding(exported_dit):
    """Graphs for batch 1 and 4: a batch of 5 runs as 4 + 1, a batch of 3 as one padded batch of 4."""
    model, _, out = exported_dit
    runtime = ec.runtime.load(out, threads=1)
    for batch in (5, 3):
        _, inputs = ARCHITECTURES["dit"](seed=2, batch=batch)
        for skip, width in ((False, 0.5), ({0}, 0.25)):
            with torch.no_grad(), ec.force(model, skip=skip, width=width):
                expected = first_output(model(**inputs))
            with ec.force(runtime, skip=skip, width=width):
                got = first_output(runtime(**inputs))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_modified_file_makes_the_artifact_refuse_to_load(exported_dit, tmp_path):
    _, _, out = exported_dit
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    graph = next((copy / "blocks").rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="different content"):
        ec.runtime.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        ec.runtime.load(copy)


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash after the block graphs were written")


def test_an_interrupted_export_leaves_nothing_or_the_previous_artifact(exported_dit, tmp_path, monkeypatch):
    model, inputs, out = exported_dit
    monkeypatch.setattr(exporter._Exporter, "router_graphs", _crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ec.export(model, inputs, tmp_path / "fresh", buckets=[1.0], batch_sizes=[4])
    assert not (tmp_path / "fresh").exists() and list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"
    shutil.copytree(out, previous)
    before = (previous / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        ec.export(model, inputs, previous, buckets=[1.0], batch_sizes=[4])
    assert (previous / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # no staging directory left behind
    read_manifest(previous)


def test_staging_directory_swaps_in_only_on_success(tmp_path):
    ours = dict(previous=lambda path: True)  # the directory counts as a previous artifact (see test_security.py)
    target = tmp_path / "t"
    with staging_directory(target, **ours) as root:
        (root / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with staging_directory(target, **ours) as root:
            (root / "a").write_text("2")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    with staging_directory(target, **ours) as root:
        (root / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_fp16_export_runs_in_onnxruntime_and_unexported_buckets_are_refused(exported_dit, tmp_path):
    model, inputs, _ = exported_dit
    out = ec.export(model, inputs, tmp_path / "fp16", buckets=[0.5, 1.0], dtype="fp16", batch_sizes=[4], threads=1)
    manifest = read_manifest(out)
    assert manifest["dtype"] == "fp16" and manifest["buckets"] == [0.5, 1.0] and manifest["verification"]["onnxruntime"]
    graph = onnx.load(str(out / manifest["blocks"][0]["graphs"]["1"]["4"]), load_external_data=False)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    runtime = ec.runtime.load(out, threads=1)
    for width in (0.5, 1.0):
        with torch.no_grad(), ec.force(model, skip=False, width=width):
            expected = first_output(model(**inputs))
        with ec.force(runtime, skip=False, width=width):
            got = first_output(runtime(**inputs))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=2e-2 * max(1.0, float(expected.abs().max())), rtol=0)
    with ec.force(runtime, skip=False, width=0.25), pytest.raises(BucketNotExportedError, match="bucket 0"):
        runtime(**inputs)


def test_bf16_is_for_tensorrt_and_passes_the_checker(exported_dit, tmp_path):
    model, inputs, _ = exported_dit
    with pytest.raises(ConfigError, match="onnxruntime CPU"):
        ec.export(model, inputs, tmp_path / "x", dtype="bf16")
    assert not (tmp_path / "x").exists()
    out = ec.export(model, inputs, tmp_path / "bf16", buckets=[1.0], dtype="bf16", backend="tensorrt", batch_sizes=[4])
    manifest = read_manifest(out)
    assert manifest["verification"]["onnxruntime"] is False and "onnx.checker only" in manifest["verification"]["note"]
    assert manifest["backends"]["tensorrt"]["engines"] is None and manifest["backends"]["tensorrt"]["note"]
    for block in manifest["blocks"]:
        onnx.checker.check_model(str(out / block["graphs"]["3"]["4"]), full_check=True)


def test_bad_arguments_are_config_errors(exported_dit, tmp_path):
    model, inputs, _ = exported_dit
    with pytest.raises(ConfigError):
        ec.export(model, inputs, tmp_path / "x", buckets=[0.3])
    with pytest.raises(ConfigError):
        ec.export(model, inputs, tmp_path / "x", dtype="fp8")
    with pytest.raises(ConfigError):
        ec.export(model, inputs, tmp_path / "x", backend="tvm")
    other, other_inputs = ARCHITECTURES["reference_dit"]()
    ec.transform(other, example_inputs=other_inputs)
    with pytest.raises(ConfigError, match="base_factory"):
        ec.export(other, other_inputs, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export_of_a_factory_model_rebuilds_the_base_from_the_factory(tmp_path, capsys):
    out = tmp_path / "ref_dit"
    code = main(["export", "--model", "zoo:reference_dit", "--out", str(out), "--buckets", "0.5,1",
                 "--batch-sizes", "2", "--threads", "1"])
    assert code == 0 and "exported 3 blocks" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["source"]["base"] == {"kind": "factory", "path": "base", "factory": "zoo:reference_dit",
                                          "class": "DiT"}
    model, inputs = ARCHITECTURES["reference_dit"]()
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    with pytest.raises(ConfigError, match="zoo:reference_dit"):  # the factory is the user's to name, never the file's
        ec.runtime.load(out, threads=1)
    runtime = ec.runtime.load(out, threads=1, base_factory="zoo:reference_dit")
    assert type(runtime.model).__name__ == "DiT"
    for width in (0.5, 1.0):
        with torch.no_grad(), ec.force(model, skip={1}, width=width):
            expected = model(**inputs)
        with ec.force(runtime, skip={1}, width=width):
            got = runtime(**inputs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "elastic" / "elastic.json").read_text())["config"]["width_buckets"] == [0.5, 1.0]


def test_export_from_a_single_sample_keeps_routers_batch_dynamic(tmp_path):
    """A batch-1 example must not pin the routers' batch dimension (torch.export specialises sizes 0 and 1)."""
    model, inputs = ARCHITECTURES["reference_dit"](batch=1)
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=inputs)
    out = tmp_path / "b1"
    ec.export(model, inputs, out, batch_sizes=(1, 3), base_factory="zoo:reference_dit", threads=1)
    runtime = ec.runtime.load(out, threads=1, routers="onnx", base_factory="zoo:reference_dit")
    _, batch3 = ARCHITECTURES["reference_dit"](batch=3)
    with torch.no_grad():
        expected = model(**batch3)
    torch.testing.assert_close(runtime(**batch3), expected, atol=1e-4, rtol=1e-4)


def test_a_diffusers_model_with_fp32_modules_reloads_without_accelerate(tmp_path, monkeypatch):
    """Wan keeps some modules in float32 (``_keep_in_fp32_modules``): its ``from_pretrained`` refuses to load
    without ``accelerate``; the runtime rebuilds it from config and safetensors instead."""
    monkeypatch.setitem(__import__("sys").modules, "accelerate", None)  # `import accelerate` raises ImportError
    model, inputs = ARCHITECTURES["wan"](batch=2)
    assert getattr(type(model), "_keep_in_fp32_modules", None)
    ec.transform(model, example_inputs=inputs)
    out = ec.export(model, inputs, tmp_path / "wan", buckets=[0.5, 1.0], threads=1)
    runtime = ec.runtime.load(out, threads=1)
    for width in (0.5, 1.0):
        with torch.no_grad(), ec.force(model, width=width):
            expected = first_output(model(**inputs))
        with ec.force(runtime, width=width):
            got = first_output(runtime(**inputs))
        assert float((got - expected).abs().max()) <= 1e-4
