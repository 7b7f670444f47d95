"""TensorRT backend: engine-cache keys and validation (pure Python, always run) and, where TensorRT and a GPU
exist, engines built from an export compared with PyTorch (skipped here: TensorRT cannot be installed)."""
import hashlib
import importlib
import json

import pytest
import torch

from elastic_compile.errors import BackendUnavailableError, ConfigError, EngineCacheError
from elastic_compile.backends import engine_cache as ec_cache
from elastic_compile.backends.engine_cache import MAGIC, EngineCache, EngineKey, decode_entry, encode_entry

KEY = EngineKey.make("a" * 64, ["b" * 64], "10.9.0", "NVIDIA H100 80GB HBM3", (9, 0),
                     {"strongly_typed": True, "optimization_level": 3})
ENGINE = b"\x01fake serialized engine\xff" * 10


def _with(**changes):
    data = dict(onnx_sha256="a" * 64, weights_sha256=["b" * 64], tensorrt_version="10.9.0",
                gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                flags={"strongly_typed": True, "optimization_level": 3})
    data.update(changes)
    return EngineKey.make(**data)


def test_key_digest_is_stable_and_changes_with_every_field():
    assert KEY.digest() == _with().digest() == EngineKey.make(**{
        "onnx_sha256": "a" * 64, "weights_sha256": ["b" * 64], "tensorrt_version": "10.9.0",
        "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "flags": {"optimization_level": 3, "strongly_typed": True}}).digest()
    variants = [_with(onnx_sha256="c" * 64), _with(weights_sha256=["d" * 64]), _with(tensorrt_version="10.9.1"),
                _with(gpu_name="NVIDIA H200"), _with(compute_capability=(8, 9)),
                _with(flags={"strongly_typed": True, "optimization_level": 5}),
                _with(flags={"strongly_typed": True, "optimization_level": 3, "workspace_bytes": 1 << 30})]
    digests = {v.digest() for v in variants}
    assert KEY.digest() not in digests and len(digests) == len(variants)


def test_entry_round_trip(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY) == (None, None)
    cache.store(KEY, ENGINE)
    assert cache.lookup(KEY) == (ENGINE, None)
    assert decode_entry(encode_entry(KEY, ENGINE), KEY) == ENGINE


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "bad magic":
        return b"NOTMAGIC" + data[len(MAGIC):]
    if how == "truncated":
        return data[:-7]
    if how == "flipped byte":
        return data[:-1] + bytes([data[-1] ^ 0xFF])
    if how == "garbage header":
        return MAGIC + (40).to_bytes(4, "little") + b"{" * 40 + data[-10:]
    if how == "empty":
        return b""
    raise ValueError(how)


@pytest.mark.parametrize("how", ["bad magic", "truncated", "flipped byte", "garbage header", "empty"])
def test_corrupt_entries_are_detected_deleted_and_rebuilt(tmp_path, how):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, ENGINE)
    path.write_bytes(_corrupt(path.read_bytes(), how))
    payload, why = cache.lookup(KEY)
    assert payload is None and why and not path.exists()
    built = []
    engine = cache.get_or_build(KEY, lambda: built.append(1) or ENGINE, lambda data: ("engine", data))
    assert engine == ("engine", ENGINE) and built == [1]
    assert cache.lookup(KEY) == (ENGINE, None)


def test_an_entry_of_another_key_is_never_used(tmp_path):
    cache = EngineCache(tmp_path)
    other = _with(gpu_name="NVIDIA A100")
    cache.store(other, b"engine for an A100")
    cache.path(other).rename(cache.path(KEY))  # e.g. a cache directory copied between machines and renamed
    with pytest.raises(EngineCacheError, match="another key.*gpu_name"):
        decode_entry(cache.path(KEY).read_bytes(), KEY)
    engine = cache.get_or_build(KEY, lambda: ENGINE, lambda data: data)
    assert engine == ENGINE and cache.events[-1][1].startswith("rebuilt")


def test_get_or_build_hits_builds_and_rebuilds_when_tensorrt_rejects_the_payload(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build():
        builds.append(1)
        return ENGINE

    assert cache.get_or_build(KEY, build, lambda d: d) == ENGINE and len(builds) == 1
    assert cache.get_or_build(KEY, build, lambda d: d) == ENGINE and len(builds) == 1  # cache hit
    assert [e[1] for e in cache.events] == ["built", "hit"]
    # A structurally valid entry that TensorRT cannot deserialize (e.g. another libnvinfer build): rebuilt.
    attempts = []

    def picky(data):
        attempts.append(data)
        return None if len(attempts) == 1 else data

    assert cache.get_or_build(KEY, build, picky) == ENGINE and len(builds) == 2
    assert cache.events[-1][1] == "rebuilt: TensorRT could not deserialize it"
    with pytest.raises(EngineCacheError, match="deserializes"):
        EngineCache(tmp_path / "other").get_or_build(KEY, build, lambda d: None)
    with pytest.raises(EngineCacheError, match="build failed"):
        EngineCache(tmp_path / "empty").get_or_build(KEY, lambda: b"", lambda d: d)


def test_timing_cache_round_trip(tmp_path):
    cache = EngineCache(tmp_path / "c")
    assert cache.read_timing_cache() == b""
    cache.write_timing_cache(b"timing")
    assert EngineCache(tmp_path / "c").read_timing_cache() == b"timing"


def test_engine_cache_module_is_pure_python():
    source = open(ec_cache.__file__).read()
    assert "import tensorrt" not in source and "torch" not in source


def test_tensorrt_module_imports_without_tensorrt_and_says_why_it_cannot_run(tmp_path):
    module = importlib.import_module("elastic_compile.backends.tensorrt")
    available, why = module.tensorrt_available()
    if available:
        pytest.skip("TensorRT is installed here")
    assert why
    with pytest.raises(BackendUnavailableError):
        module.TensorRTBackend(tmp_path, {"blocks": []})
    entry = module.prebuild_engines(tmp_path, {"blocks": []}, {})
    assert entry["engines"] is None and entry["note"].startswith("TensorRT unavailable at export")
    with pytest.raises(ConfigError):
        module.build_flags(optimization_level=7)
    assert module.build_flags(5)["strongly_typed"] is True


def _tensorrt_or_skip():
    module = importlib.import_module("elastic_compile.backends.tensorrt")
    available, why = module.tensorrt_available()
    if not available:
        pytest.skip(f"TensorRT backend needs TensorRT and a CUDA GPU: {why}")
    return module


def test_tensorrt_engines_match_pytorch(tmp_path):
    """Runs only where TensorRT and a GPU exist: engines built from an export reproduce the PyTorch model, are
    cached (second load: all hits), and a corrupted entry is rebuilt."""
    _tensorrt_or_skip()
    import elastic_compile as ec
    from helpers import randomize_routers
    from zoo import ARCHITECTURES, first_output

    model, inputs = ARCHITECTURES["dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=1)
    ec.export(model, inputs, tmp_path / "art", backend="tensorrt")
    runtime = ec.runtime.load(tmp_path / "art", "tensorrt")
    cuda_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        expected = first_output(model(**inputs))
    got = first_output(runtime(**cuda_inputs)).cpu()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    assert ec.stats(runtime).decisions == ec.stats(model).decisions
    events = runtime.backend.cache.events
    assert events and all(e[1] == "hit" for e in events)  # built at export, reused here
    entry = next((tmp_path / "art" / "engines").glob("*.engine"))
    entry.write_bytes(entry.read_bytes()[:-100])
    rebuilt = ec.runtime.load(tmp_path / "art", "tensorrt", trt_options={"cuda_graphs": True})
    assert any(e[1].startswith("rebuilt") for e in rebuilt.backend.cache.events)
    torch.testing.assert_close(first_output(rebuilt(**cuda_inputs)).cpu(), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(first_output(rebuilt(**cuda_inputs)).cpu(), expected, atol=1e-3, rtol=1e-3)


def test_every_graph_is_keyed_with_its_block_weights_file(tmp_path):
    """Graphs reference their block's weights through external data, so an engine key must hash the weights
    file as well as the graph bytes."""
    module = importlib.import_module("elastic_compile.backends.tensorrt")
    manifest = {"blocks": [{"weights": "blocks/000/weights.bin",
                            "graphs": {"0": {"1": "blocks/000/bucket0_b1.onnx"}, "3": {"1": "blocks/000/bucket3_b1.onnx"}}},
                           {"weights": "blocks/001/weights.bin", "graphs": {"3": {"2": "blocks/001/bucket3_b2.onnx"}}}]}
    table = module._weights_by_graph(tmp_path, manifest)
    assert table == {tmp_path / "blocks/000/bucket0_b1.onnx": [tmp_path / "blocks/000/weights.bin"],
                     tmp_path / "blocks/000/bucket3_b1.onnx": [tmp_path / "blocks/000/weights.bin"],
                     tmp_path / "blocks/001/bucket3_b2.onnx": [tmp_path / "blocks/001/weights.bin"]}
    k1 = EngineKey.make("g", [hashlib.sha256(b"weights v1").hexdigest()], "10", "gpu", "9.0", {})
    k2 = EngineKey.make("g", [hashlib.sha256(b"weights v2").hexdigest()], "10", "gpu", "9.0", {})
    assert k1.digest() != k2.digest()
    assert json.loads(json.dumps(k1.to_dict())) == k1.to_dict()
