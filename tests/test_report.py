"""The report's summary sentences, runs table and plots, on records made here (no training):
each comparison said once, runs in model / budget / seed order, one colour per model in
every plot (checked on the plotted data), budgets told apart by marker on the inference-cost plot, the
threshold line on segmentation pictures."""

import zlib

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.legend import Legend

from harness.analysis import report
from harness.analysis.segment import Segmentation, plot_segmentation, segmentation_threshold
from harness.api import registry
from harness.run.records import RunRecord
from tests.checks import record_for

WINDOWS = 8


def record(name: str, bpb: float, budget: float = 1e9, seed: int = 0, tokenized: bool = False, **fields):
    model = registry.get("bytes")(registry.get("bytes").Config(d_model=16, n_layers=1, n_heads=2))
    rng = np.random.default_rng(zlib.crc32(f"{name} {budget} {seed}".encode()))
    nll = (bpb + 0.05 * rng.standard_normal(WINDOWS)) * np.log(2) * 64
    evaluation = {"bpb": float(nll.sum() / (np.log(2) * 64 * WINDOWS)), "bytes": 64 * WINDOWS, "windows": WINDOWS,
                  "window_nll_nats": nll.tolist()}
    spec = {"name": name, "adapter": "bpe" if tokenized else "bytes", "config": fields.pop("config", {})}
    made = record_for(model, run_id=f"{name}__C{budget:.2e}__s{seed}", budget_flops=budget, seed=seed,
                      tokenizer={"tokenizer": "x"} if tokenized else {}, test=evaluation, val=evaluation,
                      loss_curve=[{"step": 1, "bytes": 64, "train_bpb": bpb + 1}, {"step": 2, "bytes": 128, "train_bpb": bpb}],
                      **fields)
    return RunRecord(**made.model_dump() | {"model": spec})


def test_summary_says_each_comparison_once_and_qualifies_a_p_over_windows():
    records = [record("bpe", 2.0, tokenized=True), record("sentencepiece", 2.3, tokenized=True), record("bytes", 3.0)]
    lines = report.summary_sentences(report.ranking_table(records), report.model_kinds(records))
    assert len(lines) == 1
    line = lines[0]
    assert "**bpe** (tokenized) leads with" in line and "ahead of sentencepiece (" in line
    assert "ahead of the best tokenizer-free model, bytes (" in line and line.count("bpe") == 1
    assert "one seed: this p reflects sampling over test windows only" in line
    # the runner-up is the best of the other kind: one comparison, tagged with its kind
    records = [record("bpe", 2.0, tokenized=True), record("bytes", 2.5), record("megabyte", 2.9)]
    line, = report.summary_sentences(report.ranking_table(records), report.model_kinds(records))
    assert "ahead of bytes (tokenizer-free) (" in line and "the best tokenizer-free model" not in line
    # several seeds: Welch's t over seeds, no caveat
    records = [record(n, b + 0.01 * s, seed=s) for n, b in (("a", 2.0), ("b", 2.5)) for s in range(3)]
    line, = report.summary_sentences(report.ranking_table(records), report.model_kinds(records))
    assert "Welch t over seeds" in line and "one seed" not in line and "tokeniz" not in line


def test_runs_table_is_sorted_by_model_then_budget_then_seed():
    records = [record(n, 2.0 + b / 1e10, budget=b, seed=s) for b in (3e9, 1e9) for s in (1, 0) for n in ("b", "a")]
    table = report.runs_table(records)
    assert list(zip(table["model"], table["budget"], table["seed"])) == sorted(
        (n, b, s) for n in ("a", "b") for b in (1e9, 3e9) for s in (0, 1))


def test_an_mfu_above_one_is_left_blank_and_explained():
    """A run faster than the peak it measured had its peak taken under load: no 133% in a table."""
    records = [record("a", 2.0, mfu=0.4, matmul_peak_flops_per_s=1e11), record("b", 2.1, seed=1, mfu=1.33,
                                                                              matmul_peak_flops_per_s=5e10)]
    assert report.runs_table(records)["MFU"].tolist()[0] == 0.4 and report.runs_table(records)["MFU"].isna().tolist()[1]
    assert "| 40.0%" in report._markdown(report.runs_table(records))
    assert "1 of 2 runs trained faster than the peak they measured" in report._peak_sentence(records)
    assert "faster than the peak" not in report._peak_sentence(records[:1])


def test_every_plot_gives_a_model_the_same_colour(tmp_path, figures):
    records = [record(n, bpb, budget=b) for n, bpb in (("zeta", 2.0), ("alpha", 2.5), ("mid", 3.0)) for b in (1e9, 4e9)]
    colours = report.model_colours(r.model.name for r in records)
    assert colours == report.model_colours(["mid", "zeta", "alpha", "zeta"])  # order and repeats do not matter
    assert len(set(colours.values())) == 3
    summary = report.summary_table(records)
    report.plot_bpb_against_budget(summary, "t", tmp_path / "a.png", colours)
    report.plot_bpb_against_cost(summary, "fwd FLOPs/byte", "x", "t", tmp_path / "b.png", colours)
    report.plot_learning_curves(records, tmp_path / "c.png", colours)
    report.plot_length_distributions({"mid": [0, 3, 2], ("alpha", "alpha (entropy)"): [0, 1, 4]}, tmp_path / "d.png",
                                     "t", colours)
    assert len(figures) == 4
    for fig in figures:
        ax = fig.axes[0]
        drawn = {line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
        drawn.update({c.get_label(): c.lines[0].get_color() for c in ax.containers})  # errorbars
        assert drawn, fig
        for label, colour in drawn.items():
            name = label.split(" ")[0]
            assert mcolors.to_rgba(colour) == mcolors.to_rgba(colours[name]), (label, colour)
    # the inference-cost plot tells budgets apart by marker, in a legend of their own (no labels to overlap)
    budget_legend = next(a for a in figures[1].axes[0].artists if isinstance(a, Legend))
    assert [t.get_text() for t in budget_legend.get_texts()] == ["1e+09", "4e+09"]
    assert not figures[0].axes[0].texts and not figures[1].axes[0].texts


def test_segmentation_picture_draws_the_threshold_and_no_empty_score_axis(tmp_path, figures):
    text = b"hello world, the harness cuts bytes " * 4
    starts = np.zeros(len(text), dtype=bool)
    starts[::5] = True
    scores = np.linspace(0.0, 2.0, len(text))
    plot_segmentation(Segmentation(text, scores, starts, 64), tmp_path / "a.png", "scores", threshold=2.5)
    plot_segmentation(Segmentation(text, None, starts, 64), tmp_path / "b.png", "no scores", threshold=2.5)
    with_scores, without = figures
    ax = with_scores.axes[0]
    assert any(np.allclose(line.get_ydata(), 2.5) for line in ax.get_lines())  # the threshold line
    assert ax.get_ylim()[1] > 2.5 and "threshold 2.5" in ax.get_title()
    ax = without.axes[0]
    assert list(ax.get_yticks()) == [] and "threshold" not in ax.get_title() and not ax.get_lines()


def test_segmentation_threshold_comes_from_the_record():
    assert segmentation_threshold(record("bf", 2.0, calibration={"threshold": 0.7})) == 0.7
    assert segmentation_threshold(record("bf", 2.0, calibration={"threshold": 0.7}, config={"eval_rule": "rolling"})) is None
    entropy = {"patcher": "entropy", "theta": 1.5, "entropy_rule": "global"}
    assert segmentation_threshold(record("blt", 2.0, preparation={"facts": entropy})) == 1.5
    monotonic = {**entropy, "entropy_rule": "monotonic"}
    assert segmentation_threshold(record("blt", 2.0, preparation={"facts": monotonic})) is None
    assert segmentation_threshold(record("bytes", 2.0)) is None
