"""The command line's large-scale training path: record -> train --trajectories -> --resume."""
import json
import shutil

import pytest
import torch

from elastic_compile.cli import main
from elastic_compile.reference import ASSETS_DIR
from elastic_compile.train import TrajectoryStore
from elastic_compile.train import resume as resume_module
from resume_worker import Killed
from train_fixtures import router_state

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")


def trained_routers(path):
    import elastic_compile as ec
    from elastic_compile.reference import load_reference
    model, _, _ = load_reference()
    ec.load(model, path)
    return router_state(model)


def test_record_then_train_from_the_store_then_resume(tmp_path, monkeypatch, capsys):
    sampling = tmp_path / "sampling"   # the bundled sampling assets, at 4 steps
    shutil.copytree(ASSETS_DIR / "scheduler", sampling / "scheduler")
    config = json.loads((ASSETS_DIR / "sampling.json").read_text())
    (sampling / "sampling.json").write_text(json.dumps({**config, "num_inference_steps": 4}))
    store = tmp_path / "store"
    assert main(["record", "--samples-per-class", "1", "--batch-size", "5", "--shard-mb", "0.01",
                 "--sampling", str(sampling), "--out", str(store)]) == 0
    assert "train with: elastic-compile train --trajectories" in capsys.readouterr().out
    assert len(TrajectoryStore(store)) == 10 * 2 * 4 and (store / "index.json").is_file()
    assert main(["record", "--samples-per-class", "1", "--out", str(store)]) == 1   # never over a store
    train = ["train", "--trajectories", str(store), "--sampling", str(sampling), "--steps", "3", "--batch-size", "4",
             "--log-every", "1", "--checkpoint-every", "1", "--widths", "0.5,1", "--lr", "0.02"]
    assert main(train + ["--out", str(tmp_path / "whole")]) == 0
    calls = []

    def killed_on_second_save(tmp, path):
        calls.append(path)
        if len(calls) == 2:
            raise Killed()
        tmp.replace(path)
    monkeypatch.setattr(resume_module, "_replace", killed_on_second_save)
    with pytest.raises(Killed):
        main(train + ["--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert main(train + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, resumed = trained_routers(tmp_path / "whole" / "final"), trained_routers(tmp_path / "cut" / "final")
    assert all(torch.equal(v, resumed[k]) for k, v in whole.items())
    assert any(not torch.equal(v, trained_routers(tmp_path / "cut" / "step-000001")[k]) for k, v in whole.items())
    history = [json.loads((tmp_path / d / "train_report.json").read_text())[0]["history"] for d in ("whole", "cut")]
    assert [[e["loss"] for e in h] for h in history[0:1]] == [[e["loss"] for e in h] for h in history[1:2]]
    assert main(train + ["--out", str(tmp_path / "other"), "--resume", "--checkpoint-every", "0"]) == 1
    assert main(train + ["--out", str(tmp_path / "x"), "--data", str(store / "index.json")]) == 1
