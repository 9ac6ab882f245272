"""Bad suite files: one line naming the file and the key, exit status 2, no traceback."""

import subprocess
import sys

import pytest
import yaml

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
    ("fixed target and scaling rule", tiny_suite(inference_flops_per_byte=6e4, inference_scaling={
        "flops_per_byte": 6e4, "at_budget": 2e9, "exponent": 0.5}), "inference_scaling: give either"),
    ("negative scaling exponent", tiny_suite(inference_scaling={"flops_per_byte": 6e4, "at_budget": 2e9,
                                                                "exponent": -0.5}), "inference_scaling.exponent"),
    ("scaling rule without its anchor", tiny_suite(inference_scaling={"flops_per_byte": 6e4, "exponent": 0.5}),
     "inference_scaling.at_budget"),
    ("priming cap over the split", tiny_suite(references={"prime_bytes": 40001}), "references.prime_bytes"),
    ("priming cap of no bytes", tiny_suite(references={"prime_bytes": 0}), "references.prime_bytes"),
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


# ---- issue 16: the bad inputs that ended in a traceback, or in a line that did not say where ----

def _zip(member: str, content: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member, content)
    return buffer.getvalue()


def _files(tmp_path):
    """The data the hostile suites point at, beside the suite file."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (data / "broken.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n')
    (data / "other-field.jsonl").write_bytes(b'{"text": "ok"}\n{"body": "x"}\n')
    (data / "folder").mkdir(exist_ok=True)
    (data / "short.txt").write_bytes(b"too short\n" * 10)
    (data / "plain.bin").write_bytes(b"hello " * 20000)
    (data / "archive.zip").write_bytes(_zip("inside.txt", b"hello " * 20000))
    return data


INF = float("inf")
# (label, suite or a function of the data folder giving one (bytes: the file's content), the key the line names)
HOSTILE = [
    # these ended in a traceback
    ("non-UTF-8 .jsonl", tiny_suite(corpus={"files": "data/latin1.jsonl"}), "corpus.files"),
    ("budgets: [.inf]", tiny_suite(budgets=[INF]), "budgets[0]"),
    ("lr: .inf", tiny_suite(trainer={"batch_windows": 8, "lr": INF}), "trainer.lr"),
    ("betas: [2, 3]", tiny_suite(trainer={"batch_windows": 8, "betas": [2, 3]}), "trainer.betas[0]"),
    ("a seed of 2^70", tiny_suite(seeds=[2**70]), "seeds[0]"),
    ("files: a folder", tiny_suite(corpus={"files": "data/folder"}), "corpus.files"),
    ("a non-UTF-8 suite file", yaml.safe_dump(tiny_suite()).encode() + b"description: caf\xe9\n",
     f"line {len(yaml.safe_dump(tiny_suite()).splitlines()) + 1}"),
    ("a window longer than the val split", tiny_suite(split={"train_bytes": 40000, "val_bytes": 50, "test_bytes": 4096}),
     "eval.window"),
    # these were one line that named neither the suite file nor the key
    ("a corpus file that does not exist", tiny_suite(corpus={"files": "data/*.text"}), "corpus.files"),
    ("an impossible split", tiny_suite(corpus={"files": "data/short.txt"}), "split"),
    ("a .jsonl line that is not JSON", tiny_suite(corpus={"files": "data/broken.jsonl"}), "corpus.files"),
    ("a .jsonl line without the field", tiny_suite(corpus={"files": "data/other-field.jsonl"}), "corpus.field"),
    ("a url that cannot be read", lambda data: tiny_suite(corpus={
        "url": (data / "absent.bin").as_uri(), "sha256": "0" * 64, "cache_dir": str(data / "cache")}), "corpus.url"),
    ("a url with another sha256", lambda data: tiny_suite(corpus={
        "url": (data / "plain.bin").as_uri(), "sha256": "0" * 64, "cache_dir": str(data / "cache")}), "corpus.sha256"),
    ("a zip without the member", lambda data: tiny_suite(corpus=[{"embedded": "pydoc-topics"}, {
        "url": (data / "archive.zip").as_uri(), "sha256": "0" * 64, "member": "absent.txt",
        "cache_dir": str(data / "cache")}]), "corpus[1].member"),
    ("a batch larger than the train split", tiny_suite(split={"train_bytes": 300, "val_bytes": 4096, "test_bytes": 4096}),
     "trainer.batch_windows"),
]


@pytest.mark.parametrize("label,suite,key", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_suite_gives_one_line_with_the_file_and_the_key(label, suite, key, tmp_path, capsys):
    data = _files(tmp_path)
    suite = suite(data) if callable(suite) else suite
    path = tmp_path / "suite.yaml"
    if isinstance(suite, bytes):
        path.write_bytes(suite)
    else:
        path.write_text(yaml.safe_dump(suite, sort_keys=False))
    status, err = run_cli(["run", str(path), "--results", str(tmp_path / "out"), "--quiet", "--device", "cpu"], capsys)
    assert status == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"harness: error: {path}: {key}: "), lines[0]
    assert not (tmp_path / "out").exists()  # found before anything is written
