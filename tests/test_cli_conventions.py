"""Command-line conventions (issue 25, item 8): --version, defaults in --help, every option documented, -v after
the subcommand, --json output, exit codes (typed errors 1 with one line, usage errors 2), no tracebacks for a
missing file."""
import argparse
import json
import os

import pytest

from elastic_compile import __version__
from elastic_compile.cli import build_parser, main
from elastic_compile.reference import ASSETS_DIR

HERE = os.path.dirname(__file__)


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out


def test_every_option_is_documented_and_help_shows_defaults():
    parser, subparsers = _subparsers()
    undocumented = [(name, a.option_strings) for name, sub in subparsers.items() for a in sub._actions
                    if a.option_strings and not a.help]
    assert undocumented == []
    text = subparsers["run"].format_help()
    assert "(default: onnxruntime)" in text and "(default: batch)" in text and "(default: auto)" in text
    assert "(default: 400)" in subparsers["train"].format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_verbose_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["inspect", "--model", "m", "-v"]).verbose is True
    assert parser.parse_args(["-v", "inspect", "--model", "m"]).verbose is True
    assert parser.parse_args(["inspect", "--model", "m"]).verbose is False


def test_usage_errors_exit_2(capsys):
    for argv in (["inspect"], ["run", "A", "--classes", "1", "--backend", "nope"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["inspect", "--model", "no.such.module:factory"],
    ["run", "{tmp}/missing", "--classes", "1", "--out", "{tmp}/g.png"],
    ["inspect", "--model", "{tmp}/missing"],
    ["inspect", "--model", "fixtures.factories:tiny_dit", "--inputs", "{tmp}/missing.pt"],
    ["export", "--model", "fixtures.factories:tiny_dit", "--routers", "{tmp}/missing", "--out", "{tmp}/e"],
])
def test_typed_errors_and_missing_files_exit_1_with_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_inspect_json(capsys, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    assert main(["inspect", "--model", "fixtures.factories:tiny_dit", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["blocks"]) == 3 and report["blocks"][0]["skippable"] in (True, False)
    assert report["width_buckets"] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.skipif(not (ASSETS_DIR / "transformer").is_dir(), reason="bundled reference model not built")
def test_export_and_run_json(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--model", str(ASSETS_DIR / "transformer"), "--out", str(out), "--buckets", "1",
                 "--batch-sizes", "2", "--threads", "1", "--no-verify-runtime", "--no-outside-graphs", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["out"] == str(out) and exported["buckets"] == [1.0] and exported["batch_sizes"] == [2]
    assert exported["blocks"] == 10 and exported["outside_graphs"] == 0
    # per-session pools: the CLI's default (the process-wide pool) would stay on for every later test here
    assert main(["run", str(out), "--classes", "0,1", "--steps", "1", "--threads", "1", "--thread-pool", "per_session",
                 "--out", str(tmp_path / "g.pt"), "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["images"] == 2 and ran["out"] == str(tmp_path / "g.pt") and 0 < ran["executed_flops_fraction"] <= 1.01
    assert (tmp_path / "g.pt").is_file()
