"""Scaling fits (harness.analysis.fits): L(C) = E + A C^-alpha recovered from synthetic points,
bootstrap intervals over seeds that cover the truth, a known crossover found with its
interval, the "no crossing" sentence, and no fit from too few budgets; the held-out rung: a
power law's top rung predicted within its interval, the curved form predicting better where
the points curve, and "not predictable from these rungs" where the prediction test fails."""

import json
import re

import numpy as np
import pytest
from scipy.optimize import brentq

from harness.analysis import fits
from harness.analysis.report import build_report, model_colours
from harness.run.records import write_record
from tests.conftest import ROOT
from tests.test_report import record

LADDER = 1e11 * 3.0 ** np.arange(6)  # six rungs about 3x apart, as a study's ladder


def ladder_suite(tmp_path, spec: dict) -> tuple[dict, dict]:
    """tmp_path/suite.json for records on LADDER (fidelity's corpus and reference rows, `spec` on top),
    and the corpus facts and tokenizer metrics their records carry."""
    suite = json.loads((ROOT / "results" / "fidelity" / "suite.json").read_text())
    suite["suite"] |= {"budgets": [float(c) for c in LADDER]} | spec
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    corpus = {"label": "pydoc-topics", "id": "pydoc-topics", "sha256": "0" * 64, "train_bytes": 1, "val_bytes": 1,
              "test_bytes": 512}
    tokenizer = {"tokenizer": "bpe", "vocab_size": 320, "bytes_per_token_test": 3.0, "vocab_used_test": 0.5,
                 "tokenizer_train_seconds": 0.1}
    return corpus, tokenizer


def law(E: float, at_1e11: float, alpha: float):
    """A power law through at_1e11 bpb at 1e11 FLOPs, and its A."""
    A = (at_1e11 - E) * 1e11 ** alpha
    return (lambda c: E + A * np.asarray(c, dtype=float) ** -alpha), A


def noisy_points(curve, seeds: int, noise: float, seed: int) -> dict[float, list[float]]:
    rng = np.random.default_rng(seed)
    return {float(c): list(curve(c) + noise * rng.standard_normal(seeds)) for c in LADDER}


def test_an_exact_power_law_is_recovered_exactly():
    curve, A = law(1.2, 3.2, 0.3)
    fitted = fits.fit_curve(LADDER, curve(LADDER))
    assert (fitted.E, fitted.A, fitted.alpha) == pytest.approx((1.2, A, 0.3), rel=1e-6)


def test_noisy_points_give_the_known_parameters_within_their_intervals():
    curve, A = law(1.2, 3.2, 0.3)
    result = fits.fit_model("m", "bytes", "tokenizer-free", noisy_points(curve, seeds=3, noise=0.01, seed=1))
    c = result.curve
    assert c.E == pytest.approx(1.2, abs=0.03)
    assert c.alpha == pytest.approx(0.3, abs=0.02)
    assert c.A == pytest.approx(A, rel=0.25)
    for name, truth in (("E", 1.2), ("A", A), ("alpha", 0.3)):
        low, high = result.interval(name)
        assert low < truth < high, name
    assert len(result.replicates) == fits.RESAMPLES and result.residual() < 0.02
    # with one seed per budget there is nothing to resample: no interval rather than a made-up one
    single = fits.fit_model("m", "bytes", "tokenizer-free", noisy_points(curve, seeds=1, noise=0.01, seed=1))
    assert single.curve is not None and single.interval("E") is None
    # the curve passes inside every rung's 95% seed interval; with one seed no miss can be judged
    assert result.missed() == [] and fits.missed_label(result) == "0 of 6"
    assert single.missed() is None and fits.missed_label(single) == "one seed per budget"


def test_points_that_bend_away_from_a_power_law_are_flagged_and_their_crossovers_called_rough():
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)
    bent = lambda c: byte(c) - 0.3 * (np.asarray(c) >= LADDER[-2])  # a step down at the top two rungs
    fitted = _fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", bent)})
    assert fitted["bpe"].missed() == [] and len(fitted["bytes"].missed()) >= 2
    assert fits.fit_table(fitted, fits.without_lowest_rung(fitted)).set_index("model").loc["bytes", "rungs missed"] != "0 of 6"
    sentence = fits.summary_sentence(_scaling(fitted))
    assert "1 of 2 fits in this form pass outside the 95% seed interval" in sentence
    assert "bytes: not predictable from these rungs" in sentence  # and no form predicts its top rung
    straight = _fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", byte)})
    assert "pass outside" not in fits.summary_sentence(_scaling(straight))


def test_the_bounds_hold_when_bpb_does_not_fall_with_compute():
    rising = {float(c): [2.0 + 0.01 * i] for i, c in enumerate(LADDER)}
    c = fits.fit_model("m", "bytes", "tokenizer-free", rising).curve
    assert c.E >= 0 and c.A > 0 and 0 < c.alpha <= fits.MAX_ALPHA


def _scaling(fitted: dict[str, fits.ModelFit]) -> fits.ScalingFits:
    return fits.scaling_fits(fitted, resamples=200)


def _fits(curves: dict[str, tuple], seeds: int = 3, noise: float = 0.005) -> dict[str, fits.ModelFit]:
    return {name: fits.fit_model(name, adapter, kind, noisy_points(curve, seeds, noise, seed=i))
            for i, (name, (adapter, kind, curve)) in enumerate(curves.items())}


def test_a_known_crossover_is_found_with_an_interval_that_covers_it():
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)  # worse at the bottom rung, better in the limit
    spm, _ = law(1.6, 3.1, 0.15)
    truth = 10 ** brentq(lambda t: byte(10 ** t) - bpe(10 ** t), 11, 16)
    assert LADDER[-1] < truth < fits.EXTRAPOLATION * LADDER[-1]  # found by extrapolating past the top rung
    fitted = _fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", byte),
                    "sentencepiece": ("sentencepiece", "tokenized", spm)})
    (found,) = fits.crossovers(fitted)  # only byte-level models are compared, and only with BPE
    assert (found.model, found.reference, found.ahead) == ("bytes", "bpe", True)
    assert abs(np.log10(found.compute / truth)) < 0.15
    # the interval brackets the estimate and stays in range (whether it covers the truth is a matter
    # of the draw: resampling 3 seeds runs narrow, about 88% coverage in a simulation of 25 draws)
    assert found.interval[0] < found.compute < found.interval[1] < fits.EXTRAPOLATION * LADDER[-1]
    assert found.crossed > 0.9
    # the summary states it in the form that predicted the held-out rung best, which every form passes here
    scaling = _scaling(fitted)
    (stated,) = fits.crossovers(scaling.best)
    assert abs(np.log10(stated.compute / truth)) < 0.15
    sentence = fits.summary_sentence(scaling)
    assert f"bytes crosses bpe at {stated.compute:.3g} training FLOPs [95%: " in sentence
    assert "bytes ahead above it (held-out errors bytes " in sentence and fits.NOT_PREDICTABLE not in sentence
    assert "Fitted without the lowest rung: bytes crosses bpe at " in sentence


def test_curves_that_do_not_meet_give_the_no_crossing_sentence():
    bpe, _ = law(1.6, 3.0, 0.2)
    byte, _ = law(2.0, 3.5, 0.2)  # worse everywhere, and in the limit
    fitted = _fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", byte)})
    (found,) = fits.crossovers(fitted)
    assert found.compute is None and found.crossed < 0.05 and not found.ahead
    assert fits.describe(found) == "bytes: no crossing within 100x of the top rung"
    assert "bytes: no crossing within 100x of the top rung" in fits.summary_sentence(_scaling(fitted))
    # better everywhere is not "no crossing" alone: the sentence and the table say who leads
    ahead = _fits({"bpe": ("bpe", "tokenized", byte), "bytes": ("bytes", "tokenizer-free", bpe)})
    (found,) = fits.crossovers(ahead)
    assert found.compute is None and found.ahead
    assert fits.describe(found) == "bytes: ahead of bpe from the lowest rung both curves fit to 100x the top rung, no crossing"
    assert fits.crossover_table([found], []).loc[0, "ahead above it"] == "bytes (throughout)"


def test_the_crossover_is_estimated_again_without_the_lowest_rung():
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)
    exact = {name: fits.fit_model(name, adapter, kind, {float(c): [float(curve(c))] * 2 for c in LADDER})
             for name, adapter, kind, curve in (("bpe", "bpe", "tokenized", bpe),
                                                ("bytes", "bytes", "tokenizer-free", byte))}
    (full,) = fits.crossovers(exact)
    (trimmed,) = fits.crossovers(fits.without_lowest_rung(exact))
    assert trimmed.compute == pytest.approx(full.compute, rel=1e-3)  # a true power law: any 5 rungs give it
    assert fits.crossover_table([full], [trimmed]).loc[0, "without the lowest rung"] == f"{trimmed.compute:.3g}"
    assert fits.fit_table(exact, fits.without_lowest_rung(exact)).set_index("model").loc["bytes", "alpha without the lowest rung"] == "0.200"
    # a lowest rung off the law moves the estimate, and the summary shows both
    kinked = dict(exact, bytes=fits.fit_model("bytes", "bytes", "tokenizer-free",
                                              {float(c): [float(byte(c)) + 0.5 * (c == LADDER[0])] * 2 for c in LADDER}))
    (moved,) = fits.crossovers(fits.without_lowest_rung(kinked))
    assert moved.compute == pytest.approx(full.compute, rel=1e-3)
    assert fits.crossovers(kinked)[0].compute != pytest.approx(full.compute, rel=0.05)


def test_too_few_budgets_give_no_fit_and_say_so(tmp_path):
    curve, _ = law(1.2, 3.2, 0.3)
    three = {c: v for c, v in list(noisy_points(curve, 3, 0.01, 0).items())[:3]}
    fitted = {"bpe": fits.fit_model("bpe", "bpe", "tokenized", three),
              "bytes": fits.fit_model("bytes", "bytes", "tokenizer-free", three)}
    assert fitted["bytes"].curve is None and fits.crossovers(fitted) == []
    assert fits.summary_sentence(_scaling(fitted)) is None
    colours = model_colours(fitted)
    assert fits.fits_section(_scaling(fitted), "c", tmp_path, colours, scaled_suite=False) == []
    (sentence, _) = fits.fits_section(_scaling(fitted), "c", tmp_path, colours, scaled_suite=True)
    assert sentence == "Scaling fits need at least 4 budgets per model; these records have 3, so no curve is fitted."
    assert not (tmp_path / "fits_c.png").exists()


def test_the_section_from_records_has_the_table_the_crossovers_and_the_plot(tmp_path):
    bpe, _ = law(1.6, 3.0, 0.2)
    byte, _ = law(1.0, 3.6, 0.35)
    records = [record(name, float(curve(c)) + 0.01 * seed, budget=float(c), seed=seed, tokenized=name == "bpe")
               for name, curve in (("bpe", bpe), ("bytes", byte)) for c in LADDER for seed in range(2)]
    records += [record("megabyte", 3.0, budget=float(c)) for c in LADDER[:2]]  # too few budgets for a fit
    fitted = fits.fit_records(records, {"bpe": "tokenized", "bytes": "tokenizer-free", "megabyte": "tokenizer-free"},
                              resamples=50)
    assert sorted(fitted["bytes"].points) == sorted(LADDER) and len(fitted["bytes"].points[LADDER[0]]) == 2
    text = "\n".join(fits.fits_section(_scaling(fitted), "c", tmp_path, model_colours(fitted), scaled_suite=True))
    assert "### Scaling fits" in text and "no fit: 2 budgets, 4 needed" in text
    assert any(line.startswith("| bytes ") and "| bpe " in line for line in text.splitlines())  # a crossover row
    assert "#### Held-out rung" in text  # each form's prediction of the top rung, per model
    assert any(line.startswith("| bytes ") and "| upper rungs " in line for line in text.splitlines())
    assert "![scaling fits with their extrapolation](plots/fits_c.png)" in text
    assert (tmp_path / "fits_c.png").stat().st_size > 1000


def test_a_report_on_a_ladder_has_the_fits_the_crossover_sentence_and_the_plot(tmp_path):
    """build_report on records of six budgets: the summary's crossover sentence and the section."""
    corpus, tokenizer = ladder_suite(tmp_path, {"inference_scaling": {"flops_per_byte": 1e5, "at_budget": 1e11,
                                                                       "exponent": 0.5}})
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)
    for name, curve in (("bpe", bpe), ("bytes", byte)):
        for c in LADDER:
            for seed in range(2):
                made = record(name, float(curve(c)), budget=float(c), seed=seed, tokenized=name == "bpe", corpus=corpus)
                if name == "bpe":  # the tokenizer facts the report's tokenizer table reads
                    made = made.model_copy(update={"tokenizer": tokenizer})
                write_record(tmp_path / "runs" / made.run_id / "record.json", made)
    text = build_report(tmp_path, tmp_path)
    assert "sized to 1e+05 x (C / 1e+11)^0.5 forward FLOPs per byte" in text
    summary = text.split("## Summary")[1].split("## Corpus")[0]
    assert re.search(r"- Fitted crossovers \(.+ per model, the form whose fit to the lower rungs predicted the held-out "
                     r"top rung best: mean absolute error [0-9.]+ bpb over 2 models, .+\): bytes", summary)
    assert "### Scaling fits" in text and "#### Held-out rung" in text and (tmp_path / "plots" / "fits_pydoc-topics.png").is_file()


# ---- held-out rung: each form fitted below the top rung predicts it -----------------------------

def bending(c):
    """log L quadratic in log C, the rate growing with compute as study_v2's points do."""
    t = np.log(np.asarray(c, dtype=float) / 1e12)
    return np.exp(1.0 - 0.1 * t - 0.02 * t ** 2)


def test_the_log_polynomial_forms_recover_their_laws_from_the_rungs_they_fit():
    curved = fits.CURVED.fit(LADDER, bending(LADDER))
    assert curved(1e15) == pytest.approx(float(bending(1e15)), rel=1e-9)
    pure = lambda c: 50.0 * np.asarray(c, dtype=float) ** -0.08
    # the upper-rungs form sees the top three rungs only: what the lower rungs do does not move it
    points = {float(c): [float(pure(c)) + (1.0 if c < LADDER[-3] else 0.0) + d for d in (-0.001, 0.001)] for c in LADDER}
    fitted = fits.fit_model("m", "bytes", "tokenizer-free", points, resamples=0, form=fits.UPPER)
    assert fitted.budgets() == list(LADDER[-3:]) and fitted.curve(1e15) == pytest.approx(float(pure(1e15)), rel=1e-9)
    assert fitted.residual() == pytest.approx(0, abs=1e-12) and fitted.missed() == []


def test_the_pooled_seed_deviation_is_the_within_budget_deviation():
    points = {1.0: [1.0, 2.0, 3.0], 2.0: [5.0, 7.0], 3.0: [4.0]}  # one seed: nothing to pool
    sd, df = fits.pooled_sd(points)
    assert df == 3 and sd ** 2 == pytest.approx((2 * np.var([1, 2, 3], ddof=1) + np.var([5, 7], ddof=1)) / 3)
    assert fits.pooled_sd({1.0: [2.0], 2.0: [3.0]}) == (0.0, 0)


def test_a_held_out_top_rung_of_a_power_law_falls_within_its_predicted_interval():
    curve, _ = law(1.2, 3.2, 0.3)
    draws = [fits.fit_model("m", "bytes", "tokenizer-free", noisy_points(curve, 3, 0.01, seed), resamples=0)
             for seed in range(10)]
    predictions = [fits.predict_top_rung(f, fits.POWER_LAW, resamples=200) for f in draws]
    for p in predictions:
        assert p.budget == LADDER[-1] and p.observed == pytest.approx(float(curve(LADDER[-1])), abs=0.02)
        assert p.interval[0] < p.predicted < p.interval[1] and p.error == p.predicted - p.observed
    assert sum(p.inside for p in predictions) >= 8  # 95% intervals: 19 of 20 draws in a simulation
    assert np.mean([abs(p.error) for p in predictions]) < 0.015  # 0.007 bpb in that simulation
    # with one seed per budget there is no interval, so the test cannot pass
    single = fits.fit_model("m", "bytes", "tokenizer-free", noisy_points(curve, 1, 0.01, 0), resamples=0)
    alone = fits.predict_top_rung(single, fits.POWER_LAW, resamples=200)
    assert alone.interval is None and not alone.inside
    # too few rungs below the top for three parameters and a miss: no prediction
    five = fits.fit_model("m", "bytes", "tokenizer-free", dict(list(draws[0].points.items())[:4]), resamples=0)
    assert fits.predict_top_rung(five, fits.POWER_LAW) is None
    assert fits.predict_top_rung(five, fits.UPPER, resamples=20) is not None


def test_on_points_with_curvature_the_curved_form_predicts_better_and_gives_the_crossovers():
    bpe, _ = law(1.7, 3.0, 0.15)
    scaling = _scaling(_fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", bending)}))
    curved, power = scaling.predictions[fits.CURVED]["bytes"], scaling.predictions[fits.POWER_LAW]["bytes"]
    assert abs(curved.error) < 0.02 and curved.inside
    assert power.error > 0.1 and not power.inside  # a power law with a floor only flattens: it runs above
    assert scaling.form is fits.CURVED and scaling.scores[0].mean_abs_error < scaling.scores[1].mean_abs_error
    assert all(f.form is fits.CURVED for f in scaling.best.values())
    table = fits.held_out_table(scaling.predictions).set_index(["model", "form"])
    assert table.loc[("bytes", "curved"), "closest"] == "yes" and table.loc[("bytes", "curved"), "inside?"] == "yes"
    assert table.loc[("bytes", "power law"), "inside?"] == "no"
    assert fits.score_table(scaling.predictions).loc[0, "form"] == "curved"
    sentence = fits.summary_sentence(scaling)
    assert sentence.startswith(f"- Fitted crossovers ({fits.CURVED.formula} per model, the form whose fit to the "
                               "lower rungs predicted the held-out top rung best: mean absolute error ")


def test_a_crossover_whose_held_out_prediction_failed_is_not_predictable_from_these_rungs():
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)
    stalled = lambda c: byte(c) + 0.2 * (np.asarray(c) >= LADDER[-1])  # the top rung above every form's reach
    scaling = _scaling(_fits({"bpe": ("bpe", "tokenized", bpe), "bytes": ("bytes", "tokenizer-free", stalled)}))
    assert not any(found["bytes"].inside for found in scaling.predictions.values())
    missed = scaling.predictions[scaling.form]["bytes"]
    sentence = fits.summary_sentence(scaling)
    assert (f"bytes: not predictable from these rungs (the held-out prediction for bytes missed by "
            f"{missed.error:+.3f} bpb, outside its 95% interval)") in sentence
    assert "crosses" not in sentence and "Fitted without the lowest rung" not in sentence
    (row,) = fits.crossover_table(fits.crossovers(scaling.best), None, scaling).to_dict("records")
    assert row["crossover FLOPs"].startswith("not predictable from these rungs (fit: ")
    assert row["held-out test"].startswith("the held-out prediction for bytes missed by")
    assert "without the lowest rung" not in row
    # a reference that fails its test takes every crossover with it, said once
    shifted = lambda c: bpe(c) + 0.2 * (np.asarray(c) >= LADDER[-1])
    scaling = _scaling(_fits({"bpe": ("bpe", "tokenized", shifted), "bytes": ("bytes", "tokenizer-free", byte),
                              "static-4": ("bytes", "tokenizer-free", byte)}))
    sentence = fits.summary_sentence(scaling)
    assert "): bytes, static-4: not predictable from these rungs (the held-out prediction for bpe missed by " in sentence
    assert sentence.count("not predictable") == 1 and "so no crossing with bpe is tested" in sentence


def test_a_rung_held_out_beyond_the_ladder_is_predicted_by_fits_that_never_saw_it(tmp_path):
    """The suite's `holdout` rung: left out of every fit (the ladder's own held-out test is what it
    would be without it) and predicted by each form fitted to every ladder rung."""
    beyond = float(LADDER[-1] * 3)
    bpe, _ = law(1.7, 3.0, 0.15)
    byte, _ = law(1.5, 4.0, 0.2)

    observed = []

    def report(folder, holdout_runs: bool) -> str:
        folder.mkdir()
        corpus, tokenizer = ladder_suite(folder, {"holdout": {"budget": beyond, "rows": ["bytes"], "seeds": [0, 1]}})
        budgets = [*LADDER, beyond] if holdout_runs else LADDER
        for name, curve in (("bpe", bpe), ("bytes", byte)):
            for c in budgets if name == "bytes" else LADDER:
                for seed in range(2):
                    made = record(name, float(curve(c)) + 0.004 * seed, budget=float(c), seed=seed,
                                  tokenized=name == "bpe", corpus=corpus)
                    if name == "bpe":
                        made = made.model_copy(update={"tokenizer": tokenizer})
                    if c == beyond:
                        observed.append(made.test.bpb)
                    write_record(folder / "runs" / made.run_id / "record.json", made)
        return build_report(folder, folder)

    with_rung, without = report(tmp_path / "with", True), report(tmp_path / "without", False)
    held_out = lambda text: text.split("#### Held-out rung")[1].split("####")[0].strip()
    assert held_out(with_rung) == held_out(without) and "#### Beyond the ladder" not in without
    section = with_rung.split("#### Beyond the ladder")[1]
    row = [cell.strip() for cell in next(line for line in section.splitlines()
                                         if line.startswith("| bytes ") and "| power law " in line).split("|")]
    assert row[2] == f"{beyond:.3g}" and row[5] == f"{np.mean(observed):.3f}" and row[7] == "yes"  # the true law: inside
    assert f"At {beyond:.3g} training FLOPs, the rung held out beyond the ladder (run by 1 row only), **bytes**" in with_rung
    assert re.search(rf"- Beyond the ladder, at {re.escape(f'{beyond:.3g}')} training FLOPs \(held out of every fit\): .*power law by "
                     r"[0-9.]+ bpb on average \(1 of 1 inside", with_rung.split("## Summary")[1])
