"""The elastic-compile command line, run in-process."""
import os

import pytest
import torch

from elastic_compile.cli import main
from elastic_compile.reference import ASSETS_DIR

HERE = os.path.dirname(__file__)


def test_inspect_prints_the_report(capsys, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    assert main(["inspect", "--model", "fixtures.factories:tiny_dit"]) == 0
    out = capsys.readouterr().out
    assert "3 blocks" in out and "mlp (128 units, gelu)" in out


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
def test_inspect_takes_a_factory_returning_the_model_first(capsys):
    """``load_reference`` returns (model, scheduler, config): the model is the first entry, its example inputs are
    synthesised (a diffusers DiT)."""
    assert main(["inspect", "--model", "elastic_compile.reference:load_reference"]) == 0
    assert "10 blocks" in capsys.readouterr().out


def test_bad_model_spec_is_a_typed_error_with_exit_code_1(capsys):
    assert main(["inspect", "--model", "no.such.module:factory"]) == 1
    assert "package.module:factory" in capsys.readouterr().err


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
def test_demo_runs_and_writes_one_side_by_side_image(tmp_path, capsys):
    from PIL import Image
    assert main(["demo", "--per-class", "1", "--rounds", "1", "--out", str(tmp_path), "--cache"]) == 0
    out = capsys.readouterr().out
    assert "FLOP fraction" in out and "speedup" in out and "PSNR vs dense" in out
    assert "--cache: the elastic model already runs with the feature cache" in out  # the bundled routers' cache
    assert [p.name for p in tmp_path.iterdir()] == ["dense_vs_elastic.png"]
    width, height = Image.open(tmp_path / "dense_vs_elastic.png").size
    assert width >= 3 * 33 and height > 10 * 33  # dense | elastic | difference: 10 digits of 8 x 4 + 1 pixels each


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
@pytest.mark.parametrize("extra", [[], ["--cache-aware", "--max-reuse", "1"],
                                   ["--objective", "rollout", "--start-from-cache", "--skip-actions", "reuse,forecast",
                                    "--widths", "1.0", "--rollout-steps", "1", "--rollout-batch", "2",
                                    "--rollout-per-class", "1"]], ids=["plain", "cache-aware", "rollout"])
def test_train_cli_saves_a_loadable_artifact(tmp_path, capsys, extra):
    import elastic_compile as ec
    from elastic_compile.reference import load_reference
    code = main(["train", "--samples-per-class", "1", "--steps", "3", "--batch-size", "16", "--log-every", "1",
                 "--out", str(tmp_path)] + extra)
    assert code == 0
    assert (tmp_path / "train_report.json").is_file()
    model, _, _ = load_reference()
    ec.load(model, tmp_path / "final")
    assert len(ec.report(model).blocks) == 10
    assert "executed FLOP fraction" in capsys.readouterr().out
    torch.manual_seed(0)
