"""Property tests (hypothesis) over configs, manifests and corrupted files: whatever the values, the toolkit either
works or raises an ElasticCompileError (never a raw exception, never a hang), and a failed save leaves the
previous artifact or the new one, never a partial one. Examples are derandomized (the same cases on every run);
``pytest --hypothesis-show-statistics`` reports how many each test tried."""
import copy
import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import elastic_compile as ec
from elastic_compile import serialization
from elastic_compile.artifact import commit
from elastic_compile.cli.common import parse_floats, parse_ints, require
from elastic_compile.errors import ArtifactError, ConfigError, ElasticCompileError
from elastic_compile.sampling import SamplingConfig
from elastic_compile.train.distill import check_train_options
from security_helpers import rewrite_manifest, saved_artifact, time_limit

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIMIT = 60  # seconds per case: a hang fails the case, not the suite

numbers = st.one_of(st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 0.5, 1.0, -1, 2, 64]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers.filter(lambda v: not isinstance(v, float) or math.isfinite(v)),
              st.text(max_size=12), st.sampled_from(["float32", "../x", "/etc/passwd", "os:abort", "1", "nan"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
anything = st.one_of(json_values, numbers, st.tuples(numbers, numbers))


# configs and options ----------------------------------------------------------------------------------------------
@settings(max_examples=400, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["width_buckets", "threshold", "allow_skip", "router_hidden", "router_min_hidden",
                                        "router_param_budget", "importance", "verify", "verify_atol", "extra", "x"]),
                       anything, max_size=5))
def test_elastic_config_is_valid_or_a_config_error(fields):
    try:
        config = ec.ElasticConfig.from_dict(fields)
    except ConfigError:
        return
    assert list(config.width_buckets) == sorted(set(config.width_buckets)) and config.width_buckets[-1] == 1.0
    assert 0 < config.threshold < 1 and math.isfinite(config.verify_atol) and config.verify_atol >= 0
    assert isinstance(config.allow_skip, bool) and isinstance(config.verify, bool)
    assert 1 <= config.router_min_hidden <= config.router_hidden


@settings(max_examples=300, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["num_inference_steps", "guidance_scale", "sample_size", "in_channels",
                                        "num_classes", "null_class", "scheduler", "prediction"]), anything, max_size=4))
def test_sampling_config_is_valid_or_a_typed_error(fields):
    try:
        config = SamplingConfig.from_dict(fields)
    except ElasticCompileError:
        return
    assert math.isfinite(config.guidance_scale) and config.guidance_scale >= 0 and config.num_inference_steps >= 1


@settings(max_examples=300, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["budget", "steps", "lr", "batch_size", "budget_weight", "cache_max_reuse",
                                        "base_lr", "log_every", "checkpoint_every", "lr_schedule", "task_weight"]),
                       anything, max_size=4))
def test_train_options_are_valid_or_a_config_error(options):
    try:
        check_train_options(**options)
    except ConfigError:
        return
    assert all(not isinstance(v, bool) and (isinstance(v, str) or math.isfinite(v)) for v in options.values())


@settings(max_examples=300, **SETTINGS)
@given(st.text(max_size=20), st.one_of(st.none(), numbers))
def test_command_line_values_parse_or_raise_config_errors(text, value):
    for parse in (lambda: parse_ints(text, "--x", low=0), lambda: parse_floats(text, "--x"),
                  lambda: require(value, "--x", 1, 100)):
        try:
            parse()
        except ConfigError:
            pass


# manifests and files of a saved artifact --------------------------------------------------------------------------
def json_paths(value, prefix=()):
    """Every path into a JSON value (keys and list indices)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from json_paths(child, prefix + (key,))


def mutate(manifest, path, action, value):
    """Delete, replace or (lists) extend the value at ``path``."""
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "extend" and isinstance(parent[key], list):
        parent[key].append(value)
    else:
        parent[key] = value


def _typed_or_working(call):
    with time_limit(LIMIT):
        try:
            return call()
        except ElasticCompileError:
            return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "a"
    base, inputs, _ = saved_artifact(root)
    manifest = json.loads((root / "elastic.json").read_text())
    return root, base, inputs, manifest, [p for p in json_paths(manifest) if p and p[0] != "manifest_sha256"]


def _load_and_run(base, root, inputs):
    model = ec.load(copy.deepcopy(base), root)
    with torch.no_grad():
        return model(**inputs)


def _edited_case(data, root, name, paths, call):
    """One random edit of manifest ``root/name`` (hashes and seal recomputed), then ``call``; restored after."""
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["delete", "replace", "extend"]))
    value = data.draw(json_values)
    original = (root / name).read_text()
    try:
        rewrite_manifest(root, name, lambda m: mutate(m, path, action, value))
        _typed_or_working(call)
    finally:
        (root / name).write_text(original)


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_any_edit_of_a_save_manifest_loads_or_raises_a_typed_error(saved, data):
    root, base, inputs, _, paths = saved
    _edited_case(data, root, "elastic.json", paths, lambda: _load_and_run(base, root, inputs))


corruptions = st.one_of(st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255)),
                        st.tuples(st.just("truncate"), st.integers(0, 10 ** 9), st.just(0)),
                        st.tuples(st.just("append"), st.integers(1, 64), st.integers(0, 255)))


def corrupt(file, kind, where, byte):
    data = bytearray(file.read_bytes())
    if kind == "flip" and data:
        data[where % len(data)] ^= byte
    elif kind == "truncate":
        data = data[:where % max(1, len(data))]
    else:
        data += bytes([byte]) * where
    file.write_bytes(bytes(data))


def _same_json(data: bytes, original: bytes) -> bool:
    try:
        return json.loads(data) == json.loads(original)
    except ValueError:
        return False


def _corrupted_case(root, name, manifest_name, corruption, reseal, call):
    file = root / name
    original, manifest = file.read_bytes(), (root / manifest_name).read_text()
    try:
        corrupt(file, *corruption)
        assume(file.read_bytes() != original)
        if name == manifest_name:  # whitespace around the JSON changes no value: nothing to refuse
            assume(not _same_json(file.read_bytes(), original))
        if reseal:  # hashes recomputed: the file's own checks must catch what they can
            rewrite_manifest(root, manifest_name)
            _typed_or_working(call)
        else:
            with time_limit(LIMIT), pytest.raises(ArtifactError):
                call()
    finally:
        file.write_bytes(original)
        (root / manifest_name).write_text(manifest)


@settings(max_examples=300, **SETTINGS)
@given(st.sampled_from(["elastic.json", "permutations.safetensors", "routers.safetensors"]), corruptions,
       st.booleans())
def test_a_corrupted_save_artifact_is_an_artifact_error(saved, name, corruption, reseal):
    root, base, inputs, _, _ = saved
    _corrupted_case(root, name, "elastic.json", corruption, reseal and name != "elastic.json",
                    lambda: _load_and_run(base, root, inputs))


# manifests and files of an export ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_copy(tiny_export, tmp_path_factory):
    out, _, inputs = tiny_export
    root = tmp_path_factory.mktemp("export") / "x"
    shutil.copytree(out, root)
    manifest = json.loads((root / "manifest.json").read_text())
    files = sorted(manifest["files"])
    return root, inputs, [p for p in json_paths(manifest) if p and p[0] not in ("manifest_sha256", "files")], files


def _runtime_and_call(root, inputs):
    runtime = ec.runtime.load(root, threads=1)
    return runtime(**inputs)


@settings(max_examples=120, **SETTINGS)
@given(st.data())
def test_any_edit_of_an_export_manifest_loads_or_raises_a_typed_error(export_copy, data):
    root, inputs, paths, _ = export_copy
    _edited_case(data, root, "manifest.json", paths, lambda: _runtime_and_call(root, inputs))


@settings(max_examples=80, **SETTINGS)
@given(st.data(), corruptions, st.booleans())
def test_a_corrupted_export_is_an_artifact_error(export_copy, data, corruption, reseal):
    root, inputs, _, files = export_copy
    name = data.draw(st.sampled_from(files + ["manifest.json"]))
    _corrupted_case(root, name, "manifest.json", corruption, reseal and name != "manifest.json",
                    lambda: _runtime_and_call(root, inputs))


# no partial artifact ----------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(st.sampled_from(["writing-1", "writing-2", "staged", "ready", "moved_aside", "swapped", "cleaned"]),
       st.booleans())
def test_a_save_failing_anywhere_leaves_one_whole_artifact(saved, tmp_path_factory, step, previous):
    root, base, inputs, _, _ = saved
    assume(previous or step != "moved_aside")  # nothing to move aside
    work = tmp_path_factory.mktemp("partial")
    target = work / "artifact"
    model = ec.load(copy.deepcopy(base), root)
    if previous:
        ec.save(model, target)
    written = []

    def save_file(tensors, path, *args, **kwargs):
        written.append(path)
        if step == f"writing-{len(written)}":
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    def fail(name):
        if name == step:
            raise RuntimeError(f"injected at {step}")
    real = serialization.save_file
    serialization.save_file, commit.step_hook = save_file, fail
    try:
        with pytest.raises((OSError, RuntimeError)):
            ec.save(model, target)
    finally:
        serialization.save_file, commit.step_hook = real, None
    swapped = step in ("swapped", "cleaned")
    assert sorted(p.name for p in work.iterdir()) == (["artifact"] if previous or swapped else [])
    if previous or swapped:
        _load_and_run(base, target, inputs)
