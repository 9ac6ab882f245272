"""What a newcomer meets first: `harness --help` without torch, `harness init` for their own
text, plots that read at a glance, the report's wording, exported files' modes and tokenizer
class, segment pictures that do not overwrite each other, result folders kept out of git."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from harness.cli import main
from harness.commands.init import MIN_BYTES, split_sizes
from harness.run import data
from tests.conftest import ROOT

HEAVY = ("torch", "numpy", "pandas", "matplotlib", "transformers", "lm_eval", "datasets", "tokenizers")
PROBE = """
import sys
from harness.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", *sorted(m for m in {heavy!r} if m in sys.modules))
"""


def probe(argv, env_extra=None):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])} | (env_extra or {})
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["report", "--help"], ["init", "--help"],
                                  ["export", "--help"], ["segment", "--help"], ["bench", "--help"]])
def test_help_imports_no_heavy_library(argv):
    """The command line answers --help without torch and friends (they take seconds to import)."""
    out = probe(argv)
    assert "usage: harness" in out and out.splitlines()[-1] == "imported:"


def test_list_answers_from_its_cache_without_torch(tmp_path):
    """`harness list` imports every adapter once; later calls print the cached text, torch-free."""
    first = probe(["list"], {"HARNESS_CACHE_DIR": str(tmp_path)}).splitlines()
    second = probe(["list"], {"HARNESS_CACHE_DIR": str(tmp_path)}).splitlines()
    assert "torch" in first[-1] and second[-1] == "imported:"
    assert first[:-1] == second[:-1] and any(line.startswith("byteflow: ") for line in second)


def test_the_list_cache_follows_the_adapter_sources(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from harness.api import registry
    from harness.commands import listing

    assert listing.ENTRY_POINT_GROUP == registry.ENTRY_POINT_GROUP
    package = tmp_path / "my_adapters"
    package.mkdir()
    (package / "model.py").write_text("WIDTH = 64\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(listing, "entry_points", lambda group: [EntryPoint("mine", "my_adapters", group)])
    before = listing.listing_key()
    assert listing.listing_key() == before
    (package / "model.py").write_text("WIDTH = 96\n")
    assert listing.listing_key() != before


def write_text(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.embedded_corpus("pydoc-topics", size))
    return path


def test_init_writes_a_commented_suite_that_loads_and_dry_runs(tmp_path, capsys):
    from harness.run.spec import FilesCorpus
    from harness.orchestrate.suite import load_suite

    text = write_text(tmp_path / "texts" / "my notes [draft].txt", 48_000)  # glob characters in the name
    out = tmp_path / "suites" / "notes.yaml"  # in another folder: the corpus path is relative to the suite
    assert main(["init", str(text), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    suite = load_suite(out)
    corpus = suite.corpora[0]
    assert isinstance(corpus, FilesCorpus) and os.path.samefile(corpus.files.replace("[[]", "["), text)
    assert suite.name == "my-notes-draft" and [m.adapter for m in suite.models] == ["bytes", "bpe"]
    split = suite.split
    assert split.train_bytes + split.val_bytes + split.test_bytes <= 48_000
    assert split.val_bytes == split.test_bytes and split.test_bytes % suite.eval.window == 0
    lines = out.read_text().splitlines()
    for key in ("name", "corpus", "split", "eval", "budgets", "models"):  # every required key, with a comment
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert lines[at - 1].startswith("#"), key

    results = tmp_path / "results"
    assert main(["run", str(out), "--dry-run", "--results", str(results), "--quiet"]) == 0
    assert (results / suite.name / "suite.json").is_file()


def test_init_refuses_in_one_line(tmp_path, capsys):
    text = write_text(tmp_path / "notes.txt", MIN_BYTES)
    small = write_text(tmp_path / "small.txt", MIN_BYTES - 1)
    out = tmp_path / "notes.yaml"
    out.write_text("mine")
    for argv, message in ([str(tmp_path / "missing.txt")], "missing.txt: no such file"), \
                         ([str(small)], f"small.txt: {MIN_BYTES - 1:,} bytes is too small"), \
                         ([str(text), "-o", str(out)], "notes.yaml: exists; pass --force"):
        assert main(["init", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert out.read_text() == "mine"
    assert main(["init", str(text), "-o", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["name"] == "notes"


def test_split_sizes_fit_the_file():
    for size in (MIN_BYTES, 100_000, 10_000_000):
        train, held_out = split_sizes(size)
        assert 0 < held_out <= 16_384 and held_out % 128 == 0 and train + 2 * held_out <= size
        assert train >= 8 * held_out or size < 200_000


# --- plots ---------------------------------------------------------------------------------------------------


def test_one_budget_puts_the_models_side_by_side_in_order_of_bpb(tmp_path, figures):
    from harness.analysis import report
    from tests.test_report import record

    records = [record(name, bpb, budget=2.5e11) for name, bpb in (("zeta", 2.0), ("alpha", 2.5), ("mid", 1.5))]
    report.plot_bpb_against_budget(report.summary_table(records), "t", tmp_path / "a.png")
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["mid", "zeta", "alpha"]
    assert "2.5e+11 training FLOPs" in ax.get_title()


def test_length_panels_end_where_the_chunks_do_and_keep_a_spike_to_its_own_panel(tmp_path, figures):
    from harness.analysis.report import plot_length_distributions

    tail = [0, 500, 300, 150, 50] + [0] * 100 + [1]  # chunks of 1-4 bytes and one of 105 bytes
    spike = [0, 0, 0, 0, 1000]  # every chunk 4 bytes (MegaByte)
    assert plot_length_distributions({"byteflow": tail, "megabyte": spike}, tmp_path / "a.png", "t")
    panels = [ax for ax in figures[0].axes if ax.get_visible()]
    assert len(panels) == 2
    for ax in panels:
        assert ax.get_xlim()[1] < 10  # not 105
    assert max(panels[0].get_ylim()) < 0.6  # byteflow's own scale, not the spike's 1.0
    assert "longest 105 B" in panels[0].get_title()


def test_the_segment_histogram_ends_where_the_chunks_do(tmp_path, figures):
    from harness.analysis.segment import Segmentation, plot_lengths

    starts = np.zeros(2000, dtype=bool)
    starts[:1900:2] = True  # 949 chunks of 2 bytes, then one of 102
    plot_lengths(Segmentation(b"a" * 2000, None, starts, 64), tmp_path / "a.png", "t")
    ax = figures[0].axes[0]
    assert ax.get_xlim()[1] < 10 and "1 longer, up to 102 bytes" in ax.get_title()


# --- report wording ------------------------------------------------------------------------------------------


def test_calibration_is_one_table_per_adapter_with_its_own_columns():
    from harness.analysis.report import calibration_tables
    from tests.test_report import record

    records = [record("bf", 2.0, calibration={"threshold": 0.7, "target_rate": 0.25}),
               record("hn", 2.1, calibration={"bytes_per_chunk": 5.2}),
               record("plain", 2.2)]
    records[1] = records[1].model_copy(update={"model": records[1].model.model_copy(update={"adapter": "hnet"})})
    tables = calibration_tables(records)
    assert list(tables) == ["bytes", "hnet"]  # the plain record has no calibration
    assert list(tables["bytes"].columns) == ["run", "threshold", "target_rate"]
    assert list(tables["hnet"].columns) == ["run", "bytes_per_chunk"]


def test_a_suite_without_description_or_auxiliary_model_gets_no_blank_line_or_blt_sentence():
    from harness.analysis.report import suite_header
    from tests.test_report import record

    spec = {"name": "mine", "split": {"train_bytes": 1000, "val_bytes": 100, "test_bytes": 100}, "eval": {"window": 64}}
    for description in (None, "", "  "):
        text = "\n".join(suite_header(spec | {"description": description}, [record("bytes", 2.0)]))
        assert "\n\n\n" not in text and "Auxiliary" not in text and "BLT" not in text
    text = "\n".join(suite_header(spec | {"description": "Mine."}, [record("bytes", 2.0)]))
    assert text.startswith("# Suite `mine`\n\nMine.\n\nSplit 1,000")


def test_the_auxiliary_sentence_only_where_a_model_has_an_auxiliary_part():
    from harness.analysis.report import auxiliary_sentence
    from tests.test_report import record

    plain = [record("bytes", 2.0)]
    assert auxiliary_sentence(plain, {}) == ""
    entropy = plain + [record("blt", 1.9, preparation={"auxiliary_flops": 1e9})]
    assert "(in blt: their training" in auxiliary_sentence(entropy, {})
    assert "**excluded**" in auxiliary_sentence(entropy, {"count_auxiliary_flops": False})


def test_export_writes_plain_modes_and_loads_the_tokenizer_class_it_names(tmp_path, monkeypatch):
    """README: files 0644 under umask 022; the class AutoTokenizer loads, by transformers version."""
    import transformers
    from transformers import AutoTokenizer

    from harness.commands.export import export_run
    from tests.test_export import make_run

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    make_run(tmp_path / "results" / "suite" / "runs" / "run")
    (tmp_path / "results" / "suite" / "suite.json").write_text("{}")
    old = os.umask(0o022)
    try:
        export_run(tmp_path / "results" / "suite" / "runs" / "run", tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    major = int(transformers.__version__.split(".")[0])
    assert type(tokenizer).__name__ == ("TokenizersBackend" if major >= 5 else "PreTrainedTokenizerFast")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"(as run: {tmp_path / 'results' / 'suite' / 'suite.json'})" in card and "SUITE.yaml" not in card


def test_segment_pictures_are_named_after_what_was_segmented():
    from harness.commands.segment import _names_a_file, default_picture

    assert not _names_a_file("a long text " * 400) and not _names_a_file("a\0b")  # text, not a file name

    names = {default_picture("test", 0, 1024, None, None), default_picture("test", 1024, 1024, None, None),
             default_picture("test", 0, 1024, "topk", None), default_picture("my notes", 0, 50, None, 64)}
    assert names == {"segment_test_0-1024.png", "segment_test_1024-2048.png", "segment_test_0-1024_topk.png",
                     "segment_my-notes_0-50_w64.png"}


def test_results_folders_of_ones_own_stay_out_of_git():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert ignored("results/smoke/runs/x/record.json") and ignored("results/my_suite/report.md")
    committed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert committed and not [p for p in committed if ignored(p)]
    assert not ignored("results/study_v2/report.md")
