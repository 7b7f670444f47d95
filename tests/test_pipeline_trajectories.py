"""Router training data recorded through real diffusers pipelines (issue 25, item 5): ``record_pipeline_trajectories``
runs DiT, PixArt-Alpha (nested ``added_cond_kwargs``) and Flux (true CFG through ``cache_context``) pipelines built
offline, and the rows it returns reproduce the dense model's outputs and link each sample to its own previous step."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import elastic_compile as ec  # noqa: E402
from elastic_compile.errors import ConfigError, NotElasticError  # noqa: E402
from elastic_compile.sampling import denoiser_output  # noqa: E402
from elastic_compile.train import TrajectoryDataset  # noqa: E402
from elastic_compile.train import record_pipeline_trajectories  # noqa: E402
from elastic_compile.train.trajectories import TEACHER_KEY  # noqa: E402
import tiny_pipelines  # noqa: E402

TEXT = dict(height=16, width=16, max_sequence_length=8)
STEPS = 3
CALLS = {
    "dit": (tiny_pipelines.dit_pipeline, dict(class_labels=[1, 2], guidance_scale=1.0), 2),
    "pixart": (tiny_pipelines.pixart_pipeline, dict(prompt=["a cat", "a red dog"], use_resolution_binning=False,
                                                     clean_caption=False, **TEXT), 4),
    "flux true CFG": (tiny_pipelines.flux_pipeline, dict(prompt=["a cat on the grass"], negative_prompt=["blurry"],
                                                         true_cfg_scale=3.0, **TEXT), 2),
}


def _calls(call, count=2):
    return [dict(call, num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(seed))
            for seed in range(count)]


def _elastic_pipeline(name):
    build, call, rows_per_step = CALLS[name]
    pipe = build()
    dense = pipe(**_calls(call)[0]).images
    pipe.transformer = ec.transform(pipe.transformer,
                                    example_inputs=ec.capture_inputs(pipe, num_inference_steps=1, **call))
    return pipe, call, rows_per_step, dense


@pytest.mark.parametrize("name", sorted(CALLS))
def test_recorded_rows_replay_the_dense_model_and_link_each_sample_to_its_previous_step(name, tmp_path):
    pipe, call, rows_per_step, dense = _elastic_pipeline(name)
    model = pipe.transformer
    hooks_before = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    store = record_pipeline_trajectories(pipe, _calls(call), out=tmp_path / "store")
    assert len(store) == 2 * STEPS * rows_per_step
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks_before
    # the recording ran the pipeline dense: the same images as before transform
    np.testing.assert_allclose(pipe(**_calls(call)[0]).images, dense, atol=1e-5, rtol=0)

    rows = torch.arange(len(store))
    batch = store.batch(rows)
    teacher = batch.pop(TEACHER_KEY)
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        replayed = denoiser_output(model(**batch))
    torch.testing.assert_close(replayed, teacher, atol=1e-5, rtol=0)

    previous = store.previous
    first_rows = previous < 0
    assert int(first_rows.sum()) == 2 * rows_per_step               # one first step per sample and branch
    linked = rows[~first_rows]
    before = previous[linked]
    # one step earlier (time runs down), the same sample and branch (its conditioning equals the row's)
    timestep = batch["timestep"]
    assert bool((timestep[before] > timestep[linked]).all())
    condition = "class_labels" if "class_labels" in batch else "encoder_hidden_states"
    torch.testing.assert_close(batch[condition][before], batch[condition][linked], atol=0, rtol=0)


def test_flux_branches_are_recorded_apart_and_the_in_memory_dataset_saves_and_trains(tmp_path):
    pipe, call, _, _ = _elastic_pipeline("flux true CFG")
    data = record_pipeline_trajectories(pipe, _calls(call, count=1))
    conditions = data.rows["encoder_hidden_states"]
    assert not torch.equal(conditions[0], conditions[1])            # cond and uncond calls alternate
    assert data.previous.tolist() == [-1, -1] + list(range(2 * STEPS - 2))   # each links to its own branch
    data.save(tmp_path / "flux.safetensors")
    loaded = TrajectoryDataset.load(tmp_path / "flux.safetensors")
    assert torch.equal(loaded.previous, data.previous)
    report = ec.train_routers(pipe.transformer, loaded, budget=0.6, steps=4, batch_size=4, progress=False,
                              log_every=1, cache_aware=True)
    assert len(report.history) == 4 and all(np.isfinite(entry.loss) for entry in report.history)


def test_pixart_nested_arguments_round_trip_through_a_dataset_file(tmp_path):
    pipe, call, _, _ = _elastic_pipeline("pixart")
    data = record_pipeline_trajectories(pipe, _calls(call, count=1))
    assert data.shared["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    data.save(tmp_path / "pixart.safetensors")
    loaded = TrajectoryDataset.load(tmp_path / "pixart.safetensors")
    indices = torch.arange(len(loaded))
    batch = loaded.batch(indices)
    assert batch["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    with torch.no_grad(), ec.force(pipe.transformer, skip=False, width=1.0):
        torch.testing.assert_close(denoiser_output(pipe.transformer(**batch)),
                                   denoiser_output(pipe.transformer(**data.batch(indices))), atol=0, rtol=0)


def test_tensor_dicts_become_rows_and_nest_again():
    from elastic_compile.train.trajectories import flatten_arguments, nest_arguments
    arguments = {"x": torch.ones(3, 2), "added": {"resolution": torch.zeros(3, 2), "aspect_ratio": None}, "flag": True}
    flat = flatten_arguments(arguments)
    assert set(flat) == {"x", "added::resolution", "added::aspect_ratio", "flag"}
    data = TrajectoryDataset.from_calls([arguments, arguments])
    assert set(data.rows) == {"x", "added::resolution"}
    batch = data.batch(torch.tensor([0, 4]))
    assert batch["added"]["resolution"].shape == (2, 2) and batch["added"]["aspect_ratio"] is None
    assert nest_arguments(flat)["added"].keys() == arguments["added"].keys()


def test_wrong_pipelines_and_calls_are_refused():
    pipe = tiny_pipelines.dit_pipeline()
    with pytest.raises(NotElasticError):
        record_pipeline_trajectories(pipe, [{"class_labels": [1]}])
    with pytest.raises(ConfigError):
        record_pipeline_trajectories(pipe, [{"class_labels": [1]}], component="unet")
    pipe.transformer = ec.transform(pipe.transformer, example_inputs=ec.capture_inputs(
        pipe, class_labels=[1], guidance_scale=1.0, num_inference_steps=1))
    with pytest.raises(ConfigError):
        record_pipeline_trajectories(pipe, [])
    with pytest.raises(ConfigError):
        record_pipeline_trajectories(pipe, ["a cat"])


def test_cli_records_a_text_pipeline_and_trains_its_transformer_from_the_store(tmp_path, capsys):
    from elastic_compile.cli import main
    from elastic_compile.train import TrajectoryStore

    pipe = tiny_pipelines.flux_pipeline()
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on the grass\n\na red dog\n")
    store = tmp_path / "store"
    record = ["record", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(prompts), "--steps", "2",
              "--resolution", "16x16", "--call", '{"max_sequence_length": 8}', "--out", str(store)]
    assert main(record) == 0
    assert f"elastic-compile train --model {tmp_path / 'pipe' / 'transformer'}" in capsys.readouterr().out
    assert len(TrajectoryStore(store)) == 2 * 2 and TrajectoryStore(store).previous.tolist() == [-1, 0, -1, 2]
    assert main(["train", "--model", str(tmp_path / "pipe" / "transformer"), "--trajectories", str(store),
                 "--steps", "2", "--batch-size", "2", "--budget", "0.6", "--out", str(tmp_path / "routers")]) == 0
    assert (tmp_path / "routers" / "final").is_dir()
    # without recorded inputs a text model has no example inputs: one line saying how to get them
    assert main(["train", "--model", str(tmp_path / "pipe" / "transformer"), "--steps", "2",
                 "--out", str(tmp_path / "none")]) == 1
    assert "record --pipeline" in capsys.readouterr().err
    assert main(record[:-1] + [str(tmp_path / "other"), "--call", "[1]"]) == 1
