"""What the README (and the docs it sends a newcomer to) claims, checked: its first command's
suite, its commands table, its adapters, its example suite, and its quick start (`harness init`,
`run`, `report`, `export`) on a tiny text, with the file modes and class names the docs name."""

import json
import os
import re

import torch
import yaml

from harness.cli import main, parser
from harness.run import data
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_first_command_runs_the_smoke_suite_into_the_folder_it_reports():
    from harness.orchestrate.suite import load_suite

    first = code_blocks("bash")[0].splitlines()[0]
    suite_file, results = re.search(r"harness run (\S+) && harness report (\S+)", first).groups()
    assert f"results/{load_suite(ROOT / suite_file).name}" == results


def test_every_command_of_the_table_exists():
    commands = set(re.findall(r"^\| `harness ([a-z-]+)", README, flags=re.M))
    known = set(parser()._subparsers._group_actions[0].choices)
    assert commands and commands <= known, commands - known


def test_the_adapters_of_the_layout_are_the_registered_ones():
    from harness.api import available

    listed = re.search(r"one file per baseline adapter \(([^)]*)\)", README).group(1).split(", ")
    assert sorted(listed + ["byteflow"]) == sorted(available())


def test_the_example_suite_is_a_valid_suite(tmp_path):
    from harness.orchestrate.suite import load_suite

    example = next(block for block in code_blocks("yaml") if block.startswith("name:"))
    path = tmp_path / "example.yaml"
    path.write_text(example)
    suite = load_suite(path)
    assert suite.name == "smoke" and [m.adapter for m in suite.models] == ["bytes", "bpe"]


def test_the_quick_start_on_a_tiny_text_writes_what_the_docs_say(tmp_path, capsys):
    """`harness init`, `run --threads 1`, `report`, `export` on 24 kB at a budget of a few dozen steps: the files
    are 0644 under umask 022 (docs/troubleshooting.md) and a bpe run exports as LlamaForCausalLM
    (docs/records.md)."""
    text = tmp_path / "notes.txt"
    text.write_bytes(data.embedded_corpus("pydoc-topics", 24_000))
    suite_file = tmp_path / "notes.yaml"
    assert main(["init", str(text), "-o", str(suite_file)]) == 0
    suite = yaml.safe_load(suite_file.read_text())
    suite["budgets"] = [4e10]  # the quick start's command line, at a budget that takes seconds
    suite_file.write_text(yaml.safe_dump(suite))

    old_umask, old_threads = os.umask(0o022), torch.get_num_threads()
    try:
        results = tmp_path / "results"
        assert main(["run", str(suite_file), "--results", str(results), "--threads", "1", "--quiet",
                     "--device", "cpu"]) == 0
        out = results / "notes"
        assert main(["report", str(out)]) == 0
        assert main(["export", str(out / "runs" / "bpe__C4.00e10__s0"), str(tmp_path / "exported")]) == 0
    finally:
        os.umask(old_umask)
        torch.set_num_threads(old_threads)
    capsys.readouterr()

    written = [out / "suite.json", out / "report.md", *out.glob("plots/*.png"), *out.glob("runs/*/record.json"),
               *out.glob("runs/*/model.pt"), *(tmp_path / "exported").iterdir()]
    assert len(list(out.glob("runs/*/record.json"))) == 2 and list(out.glob("plots/*.png"))
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o644"}, modes
    record = json.loads((out / "runs" / "bytes__C4.00e10__s0" / "record.json").read_text())
    assert record["threads"] == 1
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
