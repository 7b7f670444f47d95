"""``elastic-compile run --pipeline DIR --prompt ...`` (issue 25, item 3): a text-conditioned export served as its
diffusers pipeline's transformer gives the images of the PyTorch elastic model in that pipeline."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import elastic_compile as ec  # noqa: E402
from elastic_compile.cli import main  # noqa: E402
from helpers import randomize_routers  # noqa: E402
import tiny_pipelines  # noqa: E402

PROMPT = "a cat on the grass"
CALL = dict(height=16, width=16, max_sequence_length=8, num_inference_steps=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-export")
    pipe = tiny_pipelines.flux_pipeline()
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    inputs = ec.capture_inputs(pipe, prompt=[PROMPT], **CALL)
    ec.transform(pipe.transformer, example_inputs=inputs)
    randomize_routers(pipe.transformer, seed=3)
    ec.export(pipe.transformer, inputs, root / "export", batch_sizes=[1], threads=1)
    expected = pipe(prompt=[PROMPT], generator=[torch.Generator().manual_seed(5)], output_type="pt", **CALL).images
    return root, expected * 2 - 1


def test_a_text_export_runs_as_its_pipelines_transformer(exported, tmp_path, capsys):
    root, expected = exported
    out = tmp_path / "images.pt"
    assert main(["run", str(root / "export"), "--pipeline", str(root / "pipe"), "--prompt", PROMPT, "--steps", "2",
                 "--resolution", "16x16", "--call", '{"max_sequence_length": 8}', "--seed", "5",
                 # per-session pools: ONNX Runtime's shared pool would stay process-wide for the other tests
                 "--threads", "1", "--thread-pool", "per_session", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    torch.testing.assert_close(torch.load(out), expected, atol=1e-4, rtol=0)
    assert result["forwards"] == 2 and result["pipeline"] == "FluxPipeline"
    assert 0 < result["executed_flops_fraction"] < 1 and result["skipped_fraction"] > 0   # routers at work


@pytest.mark.parametrize("flags", [["--prompt", PROMPT], ["--classes", "1", "--prompt", PROMPT], [],
                                   ["--prompt", PROMPT, "--pipeline", "PIPE", "--resolution", "16by16"],
                                   ["--prompt", PROMPT, "--pipeline", "PIPE", "--call", "[1]"]])
def test_wrong_combinations_are_one_line_errors(exported, tmp_path, capsys, flags):
    root, _ = exported
    flags = [str(root / "pipe") if flag == "PIPE" else flag for flag in flags]
    assert main(["run", str(root / "export"), *flags, "--out", str(tmp_path / "x.png")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
