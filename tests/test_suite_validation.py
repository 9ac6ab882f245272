"""Bad suite files: one line naming the file and the key, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from harness.cli import main
from tests.conftest import tiny_suite


def run_cli(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.err


BAD = [
    ("unknown top-level key", tiny_suite(optimiser="sgd"), "optimiser"),
    ("unknown trainer key", tiny_suite(trainer={"batch_windows": 8, "momentum": 0.9}), "trainer.momentum"),
    ("wrong type", tiny_suite(budgets=["lots"]), "budgets[0]"),
    ("unknown adapter", tiny_suite(models=[{"name": "m", "adapter": "bites"}]), "models[0].adapter"),
    ("unknown config key", tiny_suite(models=[{"name": "m", "adapter": "bytes", "config": {"widht": 3}}]), "models[0].config.widht"),
    ("wrong config type", tiny_suite(models=[{"name": "m", "adapter": "bytes", "config": {"d_model": "wide"}}]), "models[0].config.d_model"),
    ("heads that do not fit the width", tiny_suite(models=[{"name": "m", "adapter": "bytes", "config": {"d_model": 36, "n_heads": 4}}]), "models[0].config"),
    ("budget below one step", tiny_suite(budgets=[1e3]), "budgets"),
    ("missing corpus files", tiny_suite(corpus={"files": "nowhere/*.txt"}), "nowhere"),
    ("bad corpus form", tiny_suite(corpus={"embeded": "pydoc-topics"}), "corpus"),
    ("duplicate model names", tiny_suite(models=[{"name": "m", "adapter": "bytes"}, {"name": "m", "adapter": "bytes"}]), "unique"),
    ("two corpora with one label", tiny_suite(corpus=[{"embedded": "pydoc-topics"}, {"embedded": "pydoc-topics"}]), "share the label"),
    ("empty corpus list", tiny_suite(corpus=[]), "corpus"),
    ("missing key", {k: v for k, v in tiny_suite().items() if k != "split"}, "split"),
]


@pytest.mark.parametrize("label,suite,key", BAD, ids=[b[0] for b in BAD])
def test_bad_suite_gives_one_clear_line(label, suite, key, write_suite, tmp_path, capsys):
    path = write_suite(suite)
    status, err = run_cli(["run", str(path), "--results", str(tmp_path / "out"), "--quiet"], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] or "nowhere" in lines[0]
    assert key in lines[0]
    assert "Traceback" not in err


def test_missing_suite_file(tmp_path, capsys):
    status, err = run_cli(["run", str(tmp_path / "absent.yaml")], capsys)
    assert status == 2 and "absent.yaml: no such suite file" in err


def test_not_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    status, err = run_cli(["run", str(path)], capsys)
    assert status == 2 and "not valid YAML at line" in err


def test_unknown_adapter_suggests_the_close_name(write_suite, tmp_path, capsys):
    path = write_suite(tiny_suite(models=[{"name": "m", "adapter": "bites"}]))
    _, err = run_cli(["run", str(path)], capsys)
    assert "did you mean 'bytes'" in err


def test_console_script_exit_status(write_suite):
    path = write_suite(tiny_suite(budgets=["lots"]))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "budgets[0]" in done.stderr and "Traceback" not in done.stderr


def test_help_is_useful():
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "--device" in done.stdout and "skipped" in done.stdout
