"""Reference rows: primed, whole-split and per-window compressor figures, their cache,
and how the report renders new and old suite.json entries."""

import bz2
import gzip
import lzma
import random

import pandas as pd
import pyppmd
import pytest
import torch
import zstandard

from harness.run import references
from harness.run.references import cached_references, compressors, compute_references, order0_entropy
from harness.analysis.report import primed_clause, reference_table, summary_sentences


def _text(seed: int, n: int) -> bytes:
    """Word salad: compressible, but with little to find inside one short window."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


TRAIN = _text(0, 20000)
WINDOW = 128


def _windows(data: bytes) -> torch.Tensor:
    n = len(data) // WINDOW
    return torch.tensor(list(data[: n * WINDOW]), dtype=torch.uint8).view(n, WINDOW)


# two windows that repeat passages of the training split, two of fresh text
SEEN = TRAIN[5000:5000 + WINDOW] + TRAIN[12000:12000 + WINDOW]
WINDOWS = _windows(SEEN + _text(1, 2 * WINDOW))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "references"


def test_a_window_seen_in_training_costs_far_less_primed_than_alone():
    window = TRAIN[5000:5000 + WINDOW]
    for name, c in compressors().items():
        if c.primed:
            primed = references.primed_extra_bytes(c, TRAIN, [window])[0]
            assert primed < len(c.compress(window)) / 3, name
            assert primed < WINDOW / 4, name  # a match to the training split costs a few bytes


def coded_whole(c: references.Compressor, train: bytes, chunks: list[bytes]) -> list[int]:
    """The slow path that primed_extra_bytes replaces: train + window coded whole for every window."""
    size = len(train) + len(chunks[0])
    base = len(c.compress(train, size))
    return [len(c.compress(train + w, size)) - base for w in chunks]


def test_continuing_the_primed_coder_gives_the_figures_of_coding_train_and_window_whole():
    # a split over one 128 KiB zstd block and many priming pieces; more windows than cores, each different
    train = _text(2, 150_000)
    chunks = [train[1000:1000 + WINDOW], train[140_000:140_000 + WINDOW], train[-WINDOW:],
              _text(3, WINDOW), _text(4, WINDOW)]
    assert len(train) > 128 << 10 and len(train) > 8 * references.PRIMING_PIECE
    for name, c in compressors().items():
        if c.primed:
            assert references.primed_extra_bytes(c, train, chunks) == coded_whole(c, train, chunks), name


def test_a_coder_that_fails_stops_with_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="failed"):
        references.Forked(lambda: 1 // 0).result()
    with pytest.raises(RuntimeError, match="the primed xz -9e coder stopped"):  # windows of two lengths
        references.primed_extra_bytes(compressors()["xz -9e"], TRAIN, [b"ab", b"abc"])


def test_every_figure_is_what_the_compressor_produces():
    entry = compute_references(TRAIN, WINDOWS, log=lambda line: None)
    chunks = [bytes(w.tolist()) for w in WINDOWS]
    total = 8.0 / sum(map(len, chunks))
    test = entry["test"]
    assert set(test["primed_bpb"]) == {"xz -9e", "zstd -19", f"PPMd order {references.PPMD_ORDER}"}
    assert set(test["whole_split_bpb"]) == set(test["compressors_bpb"]) == {"gzip -9", "bz2 -9", "xz -9e", "zstd -19",
                                                                             f"PPMd order {references.PPMD_ORDER}"}

    def xz(b: bytes, dict_size: int) -> bytes:
        return lzma.compress(b, format=lzma.FORMAT_XZ,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}])

    def ppmd(b: bytes) -> bytes:
        return pyppmd.compress(b, max_order=references.PPMD_ORDER, mem_size=references.PPMD_MEMORY)

    zstd = zstandard.ZstdCompressor(level=19).compress
    ppmd_name = f"PPMd order {references.PPMD_ORDER}"
    # primed: C(train + window) - C(train), with the same settings on both sides
    dict_size = 1 << 15  # the power of two that holds train + a window (20 kB + 128 B)
    assert test["primed_bpb"]["xz -9e"] == total * sum(len(xz(TRAIN + w, dict_size)) - len(xz(TRAIN, dict_size))
                                                        for w in chunks)
    assert test["primed_bpb"]["zstd -19"] == total * sum(len(zstd(TRAIN + w)) - len(zstd(TRAIN)) for w in chunks)
    assert test["primed_bpb"][ppmd_name] == total * sum(len(ppmd(TRAIN + w)) - len(ppmd(TRAIN)) for w in chunks)
    # the PPMd bytes counted are a complete stream: they decode to the input
    assert pyppmd.decompress(ppmd(TRAIN + chunks[0]), max_order=references.PPMD_ORDER,
                             mem_size=references.PPMD_MEMORY) == TRAIN + chunks[0]
    # whole split and each window alone
    whole = b"".join(chunks)
    alone = {"gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0), "bz2 -9": lambda b: bz2.compress(b, 9),
             "xz -9e": lambda b: xz(b, 4096), "zstd -19": zstd, ppmd_name: ppmd}
    for name, fn in alone.items():
        assert test["compressors_bpb"][name] == total * sum(len(fn(w)) for w in chunks), name
    assert test["whole_split_bpb"]["xz -9e"] == total * len(xz(whole, 4096))  # 512 B: the smallest dictionary
    for name in ("gzip -9", "bz2 -9", "zstd -19", ppmd_name):
        assert test["whole_split_bpb"][name] == total * len(alone[name](whole)), name
    assert test["order0_entropy_bpb"] == order0_entropy(whole)
    assert lzma.decompress(references.xz_compress(whole)) == whole
    # a 256-byte window is mostly xz container, which primed coding does not pay again
    assert test["compressors_bpb"]["xz -9e"] > 2 * test["primed_bpb"]["xz -9e"]
    assert entry["windows"] == 4 and entry["window"] == WINDOW


def test_xz_dictionary_fits_the_input():
    assert references.xz_dict_size(256) == 4096
    assert references.xz_dict_size(380_256) == 1 << 19
    assert references.xz_dict_size(1 << 19) == 1 << 19


def test_references_are_cached_and_not_recomputed(cache, monkeypatch):
    lines = []
    first = cached_references(TRAIN, WINDOWS, "toy", lines.append)
    assert any("references for toy: PPMd order" in line and "primed with the training split ... 4/4 windows" in line
               for line in lines)
    assert not any("\r" in line for line in lines)
    assert len(list(cache.glob("*.json"))) == 1

    calls = []
    real = compute_references
    monkeypatch.setattr(references, "compute_references", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines.clear()
    assert cached_references(TRAIN, WINDOWS, "toy", lines.append) == first
    assert calls == [] and any("from the cache" in line for line in lines)
    # another training split, other windows or another window length is another entry
    cached_references(TRAIN[:-1], WINDOWS, "toy", lines.append)
    cached_references(TRAIN, WINDOWS[:3], "toy", lines.append)
    cached_references(TRAIN, WINDOWS.reshape(-1, WINDOW // 2), "toy", lines.append)
    assert len(calls) == 3 and len(list(cache.glob("*.json"))) == 4
    # a damaged cache file is computed again
    for path in cache.glob("*.json"):
        path.write_text("{")
    again = cached_references(TRAIN, WINDOWS, "toy", lines.append)
    assert len(calls) == 4 and again["test"] == first["test"] and again["compute_seconds"] != first["compute_seconds"]


NEW = {"format": 2, "windows": 128, "window": 256, "test": {
    "primed_bpb": {"xz -9e": 2.28, "zstd -19": 2.30, "PPMd order 16": 1.84},
    "whole_split_bpb": {"gzip -9": 2.39, "xz -9e": 2.29},
    "compressors_bpb": {"gzip -9": 5.14, "xz -9e": 7.00},
    "order0_entropy_bpb": 4.59}}
OLD = {"windows": 128, "window": 256, "test": {"compressors_bpb": {"gzip -9": 5.14, "xz -9e": 7.00},
                                               "order0_entropy_bpb": 4.59}}


def test_the_report_lists_primed_then_whole_then_alone_then_entropy():
    rows = reference_table(NEW)
    assert list(rows["reference"]) == [
        "xz -9e, primed with the training split", "zstd -19, primed with the training split",
        "PPMd order 16, primed with the training split",
        "gzip -9, whole test split at once", "xz -9e, whole test split at once",
        "gzip -9, each window alone (container overhead included)",
        "xz -9e, each window alone (container overhead included)",
        "order-0 entropy of the test windows"]
    assert list(rows["bpb"]) == [2.28, 2.30, 1.84, 2.39, 2.29, 5.14, 7.00, 4.59]
    # an old suite.json has only the per-window rows: labelled as such
    assert list(reference_table(OLD)["reference"]) == [
        "gzip -9, each window alone (container overhead included)",
        "xz -9e, each window alone (container overhead included)", "order-0 entropy of the test windows"]


def test_the_summary_compares_the_best_model_with_the_best_primed_compressor():
    assert primed_clause(1.943, {"references": NEW}) == (
        "it is 0.1030 bpb behind the best primed compressor, PPMd order 16 primed with the training split (1.8400 bpb)")
    assert primed_clause(1.80, {"references": NEW}) == (
        "it is 0.0400 bpb ahead of the best primed compressor, PPMd order 16 primed with the training split (1.8400 bpb)")
    assert primed_clause(1.80, {"references": OLD}) is None
    ranking = pd.DataFrame([{"budget": 6e11, "rank": 1, "model": "bytes", "test bpb": 1.80}])
    assert summary_sentences(ranking, {"bytes": "tokenizer-free"}, {"references": NEW}) == [
        "- At 6e+11 training FLOPs, **bytes** leads with 1.8000 bpb; it is 0.0400 bpb ahead of the best primed "
        "compressor, PPMd order 16 primed with the training split (1.8400 bpb)."]


def test_build_report_renders_new_and_old_reference_entries(tmp_path):
    import json
    import shutil

    from harness.analysis.report import build_report
    from tests.conftest import ROOT

    study = ROOT / "results" / "matched_flops"
    suite = json.loads((study / "suite.json").read_text())
    records = {path.parent: json.loads(path.read_text()) for path in study.glob("runs/pydoc-topics__*/record.json")}
    budget = max(r["budget_flops"] for r in records.values())
    runs = [run for run, r in records.items() if r["budget_flops"] == budget and r["model"]["name"] in ("bpe", "bytes")]
    assert len(runs) >= 2
    for run in runs:  # two models at the study's largest budget
        (tmp_path / "runs" / run.name).mkdir(parents=True)
        shutil.copy(run / "record.json", tmp_path / "runs" / run.name / "record.json")
    for entry, expected in ((NEW, "PPMd order 16, primed with the training split"), (OLD, "This record predates primed")):
        suite["corpora"]["pydoc-topics"]["references"] = entry
        (tmp_path / "suite.json").write_text(json.dumps(suite))
        report = build_report(tmp_path, tmp_path)
        assert expected in report
        assert "| gzip -9, each window alone (container overhead included) |" in report
        assert "| order-0 entropy of the test windows" in report
        assert ("behind the best primed compressor" in report) == (entry is NEW)


def test_a_second_run_of_a_suite_takes_the_references_from_the_cache(cache, write_suite, tmp_path, monkeypatch, capsys):
    import json

    from harness.orchestrate.runner import run_suite
    from tests.conftest import tiny_suite

    path = write_suite(tiny_suite())
    out = run_suite(path, tmp_path / "results", "cpu", show_progress=False)
    first = capsys.readouterr().out
    assert "references for pydoc-topics: PPMd order" in first and "16/16 windows" in first
    entry = json.loads((out / "suite.json").read_text())["corpora"]["pydoc-topics"]["references"]
    assert entry["windows"] == 16 and entry["window"] == 64 and entry["test"]["primed_bpb"]
    monkeypatch.setattr(references, "compute_references", lambda *a, **k: pytest.fail("computed again"))
    run_suite(path, tmp_path / "results", "cpu", show_progress=False)
    assert "references for pydoc-topics: from the cache" in capsys.readouterr().out
    assert json.loads((out / "suite.json").read_text())["corpora"]["pydoc-topics"]["references"] == entry


def test_a_priming_cap_primes_with_the_last_bytes_of_the_split():
    cap = 6000
    entry = compute_references(TRAIN, WINDOWS, log=lambda line: None, prime_bytes=cap)
    chunks = [bytes(w.tolist()) for w in WINDOWS]
    total = 8.0 / sum(map(len, chunks))
    last = TRAIN[-cap:]  # the bytes nearest the test split, computed here directly through each compressor
    dict_size = 1 << 13  # the power of two that holds 6000 B + a window
    xz = lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, filters=[  # noqa: E731
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}])
    ppmd = lambda b: pyppmd.compress(b, max_order=references.PPMD_ORDER, mem_size=references.PPMD_MEMORY)  # noqa: E731
    zstd = zstandard.ZstdCompressor(level=19).compress
    for name, fn in (("xz -9e", xz), ("zstd -19", zstd), (f"PPMd order {references.PPMD_ORDER}", ppmd)):
        assert entry["test"]["primed_bpb"][name] == total * sum(len(fn(last + w)) - len(fn(last)) for w in chunks), name
    assert entry["prime_bytes"] == cap and entry["train_bytes"] == len(TRAIN)
    # the windows at offset 5000 and 12000 lie before the last 6000 bytes: capped, they cost more than primed fully
    full = compute_references(TRAIN, WINDOWS, log=lambda line: None)
    assert entry["test"]["primed_bpb"]["xz -9e"] > full["test"]["primed_bpb"]["xz -9e"]
    # the rows that are not primed do not depend on the cap
    assert entry["test"]["whole_split_bpb"] == full["test"]["whole_split_bpb"]
    assert entry["test"]["compressors_bpb"] == full["test"]["compressors_bpb"]


def test_without_a_cap_the_entry_and_its_cache_key_are_as_before():
    entry = compute_references(TRAIN, WINDOWS, log=lambda line: None)
    assert "prime_bytes" not in entry
    assert "prime_bytes" not in references.cache_key(TRAIN, WINDOWS)
    # a cap, even one as long as the split, is another cache entry
    assert references.cache_key(TRAIN, WINDOWS, len(TRAIN)) != references.cache_key(TRAIN, WINDOWS)
    assert references.cache_key(TRAIN, WINDOWS, 6000) != references.cache_key(TRAIN, WINDOWS, 7000)


def test_a_capped_and_an_uncapped_suite_never_share_a_cached_entry(cache):
    lines = []
    full = cached_references(TRAIN, WINDOWS, "toy", lines.append)
    capped = cached_references(TRAIN, WINDOWS, "toy", lines.append, prime_bytes=6000)
    assert not any("from the cache" in line for line in lines)
    assert any("primed with the last 6,000 bytes of the training split ... 4/4 windows" in line for line in lines)
    assert capped["test"]["primed_bpb"] != full["test"]["primed_bpb"] and len(list(cache.glob("*.json"))) == 2
    assert cached_references(TRAIN, WINDOWS, "toy", lines.append, prime_bytes=6000) == capped


def test_the_report_says_how_many_bytes_primed_the_compressors():
    capped = {**NEW, "prime_bytes": 64_000_000, "train_bytes": 12_000_000_000}
    assert reference_table(capped)["reference"][0] == \
        "xz -9e, primed with the last 64,000,000 bytes of the training split"
    assert primed_clause(1.943, {"references": capped}).endswith(
        "PPMd order 16 primed with the last 64,000,000 bytes of the training split (1.8400 bpb)")
