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


def test_bad_model_spec_is_a_typed_error_with_exit_code_2(capsys):
    assert main(["inspect", "--model", "no.such.module:factory"]) == 2
    assert "package.module:factory" in capsys.readouterr().err


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
def test_demo_runs_and_writes_grids(tmp_path, capsys):
    assert main(["demo", "--per-class", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FLOP fraction" in out and "speedup" in out and "PSNR vs dense" in out
    assert (tmp_path / "dense_grid.png").is_file() and (tmp_path / "elastic_grid.png").is_file()


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
@pytest.mark.parametrize("extra", [[], ["--cache-aware", "--max-reuse", "1"]], ids=["plain", "cache-aware"])
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
