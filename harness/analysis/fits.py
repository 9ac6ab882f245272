"""Scaling fits: per model, test bpb against training compute, fitted in more than one form
(scipy, numpy), each form tested by predicting a held-out top rung; the form that predicted
best gives the compute where each byte-level model's curve crosses BPE's.

- Points: C is a run's budget (training FLOPs per run, the rung); a model's curve is fitted
  to its mean test bpb at each budget, so every rung weighs the same whatever its seeds.
- Forms (FORMS): the power law L = E + A * C^-alpha; a curved law, log L quadratic in log C,
  the simplest form whose bend may go either way (a power law with a floor only flattens,
  while points whose rate grows with compute steepen); and a pure power law (E = 0) on the
  top UPPER_RUNGS rungs only, which leaves out the small models that have not reached the
  power-law regime. Each needs one point more than its parameters, so that a fit can miss.
- Power law: L = E + a * (C / C_ref)^-alpha with C_ref the geometric mean of the budgets, so
  `a` is a bpb and the problem is well scaled; A = a * C_ref^alpha. For a fixed alpha the
  model is linear in (E, a): a grid over alpha with E >= 0 and a >= 0 gives the start,
  scipy's least_squares refines all three within E >= 0, a > 0, 0 < alpha <= MAX_ALPHA.
  The other two are polynomials in log C fitted to log L by linear least squares.
- Intervals: 95% percentile bootstrap; each replicate resamples the seeds within every budget
  (with replacement) and fits again. With one seed at every budget there is nothing to
  resample and no interval. With few seeds they run narrow: resampling n values understates
  their variance by (n - 1) / n (a simulation of 25 draws with 3 seeds: 22 covered a crossover).
- Held-out rung: per model and form, a fit to every rung but the top predicts the top rung's
  mean. Its 95% interval: the bootstrap over seeds of that fit, plus the seed noise of a mean
  of the top rung's seeds (Student t, scaled by the pooled seed standard deviation of the
  rungs below: the held-out rung itself sets only the observed mean). The error is predicted
  minus observed; the form with the smallest mean absolute error, over the models every form
  could test, predicted best.
- Goodness of fit: the rungs whose mean the fitted curve misses by more than the 95%
  Student-t interval over that rung's seeds. A curve that describes the points passes inside
  nearly all of them; a miss means the points bend in a way the form does not (a learning rate
  that changes between rungs, a floor the range does not show).
- Crossover: the first C, from the lowest rung both curves fit up to EXTRAPOLATION x the top
  rung, where a byte-level model's curve in the best form meets BPE's (brentq on the difference,
  in log C). A bootstrap replicate without a crossing counts as beyond that range, so an
  interval's upper end may read "beyond 100x the top rung". Without a crossing, which model
  leads over the whole range is said too: "no crossing" alone would read as "never ahead". The
  summary states a crossover only where the best form predicted the held-out rung of both
  models inside its interval; else "not predictable from these rungs".
- Sensitivity: with a form fitted to every rung, the crossovers are estimated again without the
  lowest rung (point estimates), because the smallest models weigh on a short curve as much as
  the largest.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.optimize import brentq, least_squares

from harness.analysis.plotting import save_plot
from harness.analysis.stats import seed_interval
from harness.run.records import RunRecord

MIN_BUDGETS = 4
MAX_ALPHA = 5.0
UPPER_RUNGS = 3  # the pure power law's rungs: two parameters and one point to miss
EXTRAPOLATION = 100.0  # crossings are sought up to this factor above the top rung
RESAMPLES = 1000
CONFIDENCE = 0.95
NO_CROSSING = f"no crossing within {EXTRAPOLATION:g}x of the top rung"
NOT_PREDICTABLE = "not predictable from these rungs"
_ALPHA_GRID = np.geomspace(1e-3, MAX_ALPHA, 80)


def _reference(budgets) -> float:
    """The geometric mean of the budgets: C / C_ref is of order 1 across a ladder."""
    return float(np.exp(np.log(np.asarray(budgets, dtype=float)).mean()))


@dataclass(frozen=True)
class Curve:
    """L(C) = E + a * (C / c_ref)^-alpha = E + A * C^-alpha."""

    E: float
    a: float
    alpha: float
    c_ref: float

    @property
    def A(self) -> float:
        return self.a * self.c_ref ** self.alpha

    def __call__(self, c):
        return self.E + self.a * (np.asarray(c, dtype=float) / self.c_ref) ** -self.alpha


def fit_curve(budgets, bpb) -> Curve:
    """Least-squares fit of E + A * C^-alpha to points (C, bpb), within the bounds above."""
    c, y = np.asarray(budgets, dtype=float), np.asarray(bpb, dtype=float)
    c_ref = _reference(c)
    x = c / c_ref
    # start: for each alpha on the grid, the best (E, a) >= 0, which is linear least squares
    basis = x[None, :] ** -_ALPHA_GRID[:, None]  # (alphas, points)
    bx, by = basis.mean(1), y.mean()
    a = np.clip(((basis - bx[:, None]) * (y - by)).sum(1) / ((basis - bx[:, None]) ** 2).sum(1), 0, None)
    e = by - a * bx
    negative = e < 0  # E >= 0: then the best a alone
    e[negative] = 0
    a[negative] = (basis[negative] @ y) / (basis[negative] ** 2).sum(1)
    sse = ((e[:, None] + a[:, None] * basis - y) ** 2).sum(1)
    i = int(np.argmin(sse))
    start = [e[i], max(a[i], 1e-9), _ALPHA_GRID[i]]
    result = least_squares(lambda p: p[0] + p[1] * x ** -p[2] - y, start,
                           bounds=([0.0, 1e-12, 1e-6], [np.inf, np.inf, MAX_ALPHA]), x_scale="jac")
    E, a_fit, alpha = result.x
    return Curve(float(E), float(a_fit), float(alpha), c_ref)


@dataclass(frozen=True)
class LogPolynomial:
    """log L as a polynomial in t = log(C / c_ref): degree 1 is a pure power law A * C^-alpha,
    degree 2 a power law whose exponent changes linearly with log C."""

    coefficients: tuple[float, ...]  # highest power first, as numpy.polyval takes them
    c_ref: float

    def __call__(self, c):
        return np.exp(np.polyval(self.coefficients, np.log(np.asarray(c, dtype=float) / self.c_ref)))


def fit_log_polynomial(degree: int, budgets, bpb) -> LogPolynomial:
    """Linear least squares of log bpb on a polynomial in log C (numpy.polyfit): relative
    errors, as a log-log plot shows them."""
    c = np.asarray(budgets, dtype=float)
    c_ref = _reference(c)
    coefficients = np.polyfit(np.log(c / c_ref), np.log(np.asarray(bpb, dtype=float)), degree)
    return LogPolynomial(tuple(float(b) for b in coefficients), c_ref)


@dataclass(frozen=True)
class Form:
    """A fitted form of L(C): its name, its formula as the report writes it, how it is fitted
    ((budgets, mean bpb) -> a curve, bpb as a function of C) and to which rungs."""

    name: str
    formula: str
    fit: Callable
    min_budgets: int  # one point more than its parameters, so that a fit can miss
    top_rungs: int | None = None  # fitted to the top this-many rungs only; None: every rung

    def rungs(self, budgets) -> list[float]:
        budgets = sorted(budgets)
        return budgets if self.top_rungs is None else budgets[-self.top_rungs:]


POWER_LAW = Form("power law", "L = E + A C^-alpha", fit_curve, MIN_BUDGETS)
CURVED = Form("curved", "log L = a + b log C + c (log C)^2", partial(fit_log_polynomial, 2), 4)
UPPER = Form("upper rungs", f"L = A C^-alpha on the top {UPPER_RUNGS} rungs", partial(fit_log_polynomial, 1),
             UPPER_RUNGS, top_rungs=UPPER_RUNGS)
FORMS = (POWER_LAW, CURVED, UPPER)


def crossing(model, reference, low: float, high: float) -> float | None:
    """The first compute in [low, high] where the two curves meet; None if they do not."""
    t = np.linspace(np.log(low), np.log(high), 400)
    gap = model(np.exp(t)) - reference(np.exp(t))
    changes = np.flatnonzero(np.signbit(gap[:-1]) != np.signbit(gap[1:]))
    if not len(changes):
        return None
    i = changes[0]
    return float(np.exp(brentq(lambda s: float(model(np.exp(s)) - reference(np.exp(s))), t[i], t[i + 1])))


def _interval(values) -> tuple[float, float] | None:
    """95% percentile interval; the order statistics themselves, so an infinite value (no
    crossing in range) stays infinite instead of turning into nan."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return None
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


@dataclass
class ModelFit:
    model: str
    adapter: str
    kind: str  # "tokenized" or "tokenizer-free"
    points: dict[float, list[float]]  # budget -> test bpb of each seed
    curve: Callable | None = None  # None: fewer than form.min_budgets budgets
    replicates: list = field(default_factory=list)  # bootstrap fits; empty with one seed per budget
    form: Form = POWER_LAW

    def budgets(self) -> list[float]:
        """The budgets the curve is fitted to."""
        return self.form.rungs(self.points)

    def interval(self, parameter: str) -> tuple[float, float] | None:
        return _interval([getattr(r, parameter) for r in self.replicates])

    def residual(self) -> float:
        budgets = self.budgets()
        means = [np.mean(self.points[b]) for b in budgets]
        return float(np.sqrt(np.mean((self.curve(budgets) - means) ** 2)))

    def missed(self) -> list[float] | None:
        """The fitted budgets whose mean the curve misses by more than their 95% t-interval over
        seeds (None when no such budget has two seeds: nothing to judge a miss by)."""
        judged = {b: seed_interval(self.points[b]) for b in self.budgets() if len(self.points[b]) >= 2}
        if not judged:
            return None
        return [b for b, (_, low, high) in judged.items() if not low <= float(self.curve(b)) <= high]


def fit_model(model: str, adapter: str, kind: str, points: dict[float, list[float]],
              resamples: int = RESAMPLES, form: Form = POWER_LAW) -> ModelFit:
    """The fit of one model's points in `form` and its bootstrap over seeds (seeded by the
    model's name, so a report is the same every time it is made)."""
    fitted = ModelFit(model, adapter, kind, points, form=form)
    if len(points) < form.min_budgets:
        return fitted
    budgets = fitted.budgets()
    fitted.curve = form.fit(budgets, [np.mean(points[b]) for b in budgets])
    if resamples == 0 or all(len(points[b]) < 2 for b in budgets):
        return fitted
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    means = np.stack([np.asarray(points[b])[rng.integers(0, len(points[b]), (resamples, len(points[b])))].mean(1)
                      for b in budgets], axis=1)  # (resamples, budgets)
    fitted.replicates = [form.fit(budgets, row) for row in means]
    return fitted


def fit_records(records: list[RunRecord], kinds: dict[str, str], resamples: int = RESAMPLES) -> dict[str, ModelFit]:
    """Per model name (sorted), its power-law fit over the records' budgets (one corpus's records)."""
    points: dict[str, dict[float, list[float]]] = {}
    adapters = {}
    for r in sorted(records, key=lambda r: (r.model.name, r.budget_flops, r.seed)):
        points.setdefault(r.model.name, {}).setdefault(r.budget_flops, []).append(r.test.bpb)
        adapters[r.model.name] = r.model.adapter
    return {name: fit_model(name, adapters[name], kinds[name], p, resamples) for name, p in points.items()}


def refit(fits: dict[str, ModelFit], form: Form, resamples: int = RESAMPLES) -> dict[str, ModelFit]:
    """The same models' points fitted in another form."""
    return {name: fit_model(name, f.adapter, f.kind, f.points, resamples, form) for name, f in fits.items()}


def without_lowest_rung(fits: dict[str, ModelFit]) -> dict[str, ModelFit]:
    """The same models fitted again without the lowest rung, in their form (point estimates, no bootstrap)."""
    lowest = min(b for f in fits.values() for b in f.points)
    return {name: fit_model(name, f.adapter, f.kind, {b: v for b, v in f.points.items() if b != lowest}, 0, f.form)
            for name, f in fits.items()}


@dataclass(frozen=True)
class Prediction:
    """A form's prediction of a model's top-rung mean from its fit to the rungs below."""

    model: str
    form: Form
    budget: float  # the held-out (top) rung
    predicted: float
    interval: tuple[float, float] | None  # 95%; None: one seed per budget, nothing to resample
    observed: float  # the top rung's mean over its seeds

    @property
    def error(self) -> float:
        return self.predicted - self.observed

    @property
    def inside(self) -> bool:
        return self.interval is not None and self.interval[0] <= self.observed <= self.interval[1]


def pooled_sd(points: dict[float, list[float]]) -> tuple[float, int]:
    """The pooled standard deviation over seeds of the budgets with two seeds or more, and its
    degrees of freedom (0 with one seed at every budget)."""
    spread = [(len(v) - 1, float(np.var(v, ddof=1))) for v in points.values() if len(v) >= 2]
    df = sum(d for d, _ in spread)
    return (float(np.sqrt(sum(d * s for d, s in spread) / df)) if df else 0.0), df


def predict_rung(f: ModelFit, form: Form, budget: float, observed: list[float],
                 resamples: int = RESAMPLES) -> Prediction | None:
    """`form` fitted to every rung of `f` other than `budget` predicts the mean of `observed`, the
    test bpb of the runs at `budget`, with the module's interval (None: too few rungs for the form)."""
    fitted_on = {b: v for b, v in f.points.items() if b != budget}
    fitted = fit_model(f.model, f.adapter, f.kind, fitted_on, resamples, form)
    if fitted.curve is None:
        return None
    interval = None
    if fitted.replicates:
        sd, df = pooled_sd(fitted_on)
        rng = np.random.default_rng(zlib.crc32(f"{f.model} {form.name}".encode()))
        noise = sd / np.sqrt(len(observed)) * rng.standard_t(df, len(fitted.replicates))
        interval = _interval(np.array([float(r(budget)) for r in fitted.replicates]) + noise)
    return Prediction(f.model, form, budget, float(fitted.curve(budget)), interval, float(np.mean(observed)))


def predict_top_rung(f: ModelFit, form: Form, resamples: int = RESAMPLES) -> Prediction | None:
    """`form` fitted to every rung of `f` but the top predicts the top rung's mean."""
    top = max(f.points)
    return predict_rung(f, form, top, f.points[top], resamples)


def predict_beyond(fits: dict[str, ModelFit], records: list[RunRecord],
                   resamples: int = RESAMPLES) -> dict[Form, dict[str, Prediction]]:
    """Each form fitted to every ladder rung of a model predicts its held-out rung beyond the ladder
    (Suite.holdout; `records`: that rung's runs, one budget), for each model that ran it."""
    observed: dict[str, list[float]] = {}
    for r in sorted(records, key=lambda r: (r.model.name, r.seed)):
        observed.setdefault(r.model.name, []).append(r.test.bpb)
    budget = records[0].budget_flops
    return {form: {name: p for name, values in observed.items() if name in fits
                   and (p := predict_rung(fits[name], form, budget, values, resamples))} for form in FORMS}


@dataclass(frozen=True)
class Score:
    """How well a form predicted the held-out rungs of the models it is compared on."""

    form: Form
    models: tuple[str, ...]
    mean_abs_error: float
    mean_error: float
    inside: int  # of those models, how many observed means fell inside the predicted interval


def scores(predictions: dict[Form, dict[str, Prediction]]) -> list[Score]:
    """Each form that could test a model, judged over the models every such form tested, best
    (smallest mean absolute error) first. A form with more parameters needs more rungs, and every
    model it tests the others test too, so these are the models of the most demanding form."""
    tested = {form: found for form, found in predictions.items() if found}
    if not tested:
        return []
    common = tuple(sorted(set.intersection(*(set(found) for found in tested.values()))))
    ranked = [Score(form, common, float(np.mean([abs(found[m].error) for m in common])),
                    float(np.mean([found[m].error for m in common])), sum(found[m].inside for m in common))
              for form, found in tested.items()]
    return sorted(ranked, key=lambda s: s.mean_abs_error)


@dataclass
class ScalingFits:
    """One corpus's fits: the power law per model (the fits table), each form's held-out
    prediction of every model's top rung, the forms' scores (best first), and the models fitted
    on every rung in the best form (the crossovers)."""

    power_law: dict[str, ModelFit]
    predictions: dict[Form, dict[str, Prediction]]
    scores: list[Score]
    best: dict[str, ModelFit]

    @property
    def form(self) -> Form:
        """The form that predicted best; the power law where none could be tested."""
        return self.scores[0].form if self.scores else POWER_LAW

    def failure(self, model: str) -> str | None:
        """Why the best form's prediction of `model`'s held-out rung fails the test; None: it passed."""
        p = self.predictions.get(self.form, {}).get(model)
        if p is None:
            return f"{model} has too few rungs below its top for a held-out prediction"
        if p.interval is None:
            return f"{model} has one seed per budget, no interval to test its held-out prediction by"
        if not p.inside:
            return f"the held-out prediction for {model} missed by {p.error:+.3f} bpb, outside its 95% interval"
        return None


def scaling_fits(power_law: dict[str, ModelFit], resamples: int = RESAMPLES) -> ScalingFits:
    """Every form's held-out predictions for the power-law fits' points, and the best form's fits."""
    predictions = {form: {name: p for name, f in power_law.items() if (p := predict_top_rung(f, form, resamples))}
                   for form in FORMS}
    ranked = scores(predictions)
    form = ranked[0].form if ranked else POWER_LAW
    best = power_law if form is POWER_LAW else refit(power_law, form, resamples)
    return ScalingFits(power_law, predictions, ranked, best)


def reference_model(fits: dict[str, ModelFit]) -> str | None:
    """The BPE model the byte-level models are compared with: the one named `bpe`, else the
    first of adapter `bpe`."""
    if "bpe" in fits:
        return "bpe"
    return next((name for name, f in fits.items() if f.adapter == "bpe"), None)


@dataclass(frozen=True)
class Crossover:
    model: str
    reference: str
    compute: float | None  # None: no crossing within the range
    ahead: bool  # whether the byte-level model is the better one above the crossing (or throughout, without one)
    interval: tuple[float, float] | None  # 95% bootstrap; inf: beyond the range
    crossed: float | None  # fraction of bootstrap replicates that cross within the range


def crossovers(fits: dict[str, ModelFit]) -> list[Crossover]:
    """Each fitted byte-level (tokenizer-free) model against the fitted BPE model, from the lowest
    rung both curves fit."""
    name = reference_model(fits)
    if name is None or fits[name].curve is None:
        return []
    reference = fits[name]
    high = EXTRAPOLATION * max(b for f in fits.values() for b in f.points)
    found = []
    for f in fits.values():
        if f.kind != "tokenizer-free" or f.curve is None:
            continue
        low = max(min(f.budgets()), min(reference.budgets()))
        compute = crossing(f.curve, reference.curve, low, high)
        at = low if compute is None else compute * 1.01  # above the crossing; anywhere without one
        ahead = bool(f.curve(at) < reference.curve(at))
        interval = crossed = None
        pairs = list(zip(f.replicates, reference.replicates))
        if pairs:
            points = [crossing(m, r, low, high) for m, r in pairs]
            crossed = sum(p is not None for p in points) / len(points)
            interval = _interval([np.inf if p is None else p for p in points])
        found.append(Crossover(f.model, name, compute, ahead, interval, crossed))
    return found


def _bound(value: float) -> str:
    return f"beyond {EXTRAPOLATION:g}x the top rung" if np.isinf(value) else f"{value:.3g}"


def describe(c: Crossover) -> str:
    """One clause: where `c.model`'s curve crosses BPE's, with its interval, or NO_CROSSING."""
    if c.compute is None:
        if c.ahead:
            return (f"{c.model}: ahead of {c.reference} from the lowest rung both curves fit to {EXTRAPOLATION:g}x "
                    "the top rung, no crossing")
        return f"{c.model}: {NO_CROSSING}"
    side = f"{c.model} ahead" if c.ahead else f"{c.reference} ahead"
    interval = "" if c.interval is None else f" [95%: {_bound(c.interval[0])}, {_bound(c.interval[1])}]"
    return f"{c.model} crosses {c.reference} at {c.compute:.3g} training FLOPs{interval}, {side} above it"


def tested(scaling: ScalingFits, found: list[Crossover]) -> list[Crossover]:
    """The crossovers whose two models both passed the best form's held-out test."""
    return [c for c in found if not scaling.failure(c.model) and not scaling.failure(c.reference)]


def form_phrase(scaling: ScalingFits) -> str:
    """Which form the crossovers use and how well it predicted the held-out rungs."""
    if not scaling.scores:
        return (f"{POWER_LAW.formula} per model; no model has enough rungs below its top for a held-out "
                "prediction, so none is tested")
    best, *others = scaling.scores
    against = "; ".join(f"{s.mean_abs_error:.3f} for {s.form.formula}" for s in others)
    which = "predicted the held-out top rung best" if others else "had enough rungs for a held-out prediction"
    return (f"{best.form.formula} per model, the form whose fit to the lower rungs {which}: mean absolute error "
            f"{best.mean_abs_error:.3f} bpb over {len(best.models)} models, {best.inside} of them inside the "
            "95% interval" + (f"; against {against}" if others else "") + "; held-out rung table")


def crossover_clause(scaling: ScalingFits, c: Crossover) -> str:
    """describe(c) with the held-out errors where the test passed; else why it is not predictable."""
    reasons = [why for why in (scaling.failure(c.model), scaling.failure(c.reference)) if why]
    if reasons:
        return f"{c.model}: {NOT_PREDICTABLE} ({'; '.join(reasons)})"
    errors = ", ".join(f"{m} {scaling.predictions[scaling.form][m].error:+.3f}" for m in (c.model, c.reference))
    return f"{describe(c)} (held-out errors {errors} bpb)"


def summary_sentence(scaling: ScalingFits) -> str | None:
    """The generated summary's sentence on the fitted crossovers (None when nothing was fitted):
    in the best form, stated only where its held-out test passed."""
    found = crossovers(scaling.best)
    if not found:
        return None
    reference = scaling.failure(found[0].reference)
    if reference:  # every clause would give the same reason
        clauses = (f"{', '.join(c.model for c in found)}: {NOT_PREDICTABLE} ({reference}, so no crossing with "
                   f"{found[0].reference} is tested)")
    else:
        clauses = "; ".join(crossover_clause(scaling, c) for c in found)
    fitted = [f for f in scaling.best.values() if f.curve is not None]
    rough = sum(bool(f.missed()) for f in fitted)
    caveat = (f" {rough} of {len(fitted)} fits in this form pass outside the 95% seed interval of at least one "
              "fitted rung's mean, so these points bend away from it and the crossovers read from them are rough"
              + (" (fits table)." if scaling.form is POWER_LAW else ".") if rough else "")
    passed = {c.model for c in tested(scaling, found)}
    trimmed = [c for c in crossovers(without_lowest_rung(scaling.best)) if c.model in passed
               and scaling.form.top_rungs is None]  # a form on the top rungs only does not see the lowest
    sensitivity = (" Fitted without the lowest rung: " + "; ".join(describe(c) for c in trimmed) + "."
                   if trimmed else "")
    return f"- Fitted crossovers ({form_phrase(scaling)}): {clauses}." + caveat + sensitivity


def _format_interval(interval: tuple[float, float] | None, fmt: str) -> str:
    return "one seed per budget" if interval is None else f"[{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def missed_label(f: ModelFit) -> str:
    missed = f.missed()
    judged = sum(len(f.points[b]) >= 2 for b in f.budgets())
    return "one seed per budget" if missed is None else f"{len(missed)} of {judged}"


def fit_table(fits: dict[str, ModelFit], trimmed: dict[str, ModelFit]) -> pd.DataFrame:
    """One row per model's power law; `trimmed`: the same models fitted without the lowest rung."""
    rows = []
    for f in fits.values():
        top = max(f.points)
        if f.curve is None:
            rows.append({"model": f.model, "budgets": len(f.points), "E": f"no fit: {len(f.points)} budgets, "
                         f"{MIN_BUDGETS} needed"})
            continue
        rows.append({"model": f.model, "budgets": len(f.points),
                     "E": f"{f.curve.E:.4f}", "E 95%": _format_interval(f.interval("E"), "{:.4f}"),
                     "A": f"{f.curve.A:.3g}", "A 95%": _format_interval(f.interval("A"), "{:.3g}"),
                     "alpha": f"{f.curve.alpha:.3f}", "alpha 95%": _format_interval(f.interval("alpha"), "{:.3f}"),
                     "rms residual": f"{f.residual():.4f}",
                     "top rung: fit - mean": f"{float(f.curve(top)) - np.mean(f.points[top]):+.3f}",
                     "rungs missed": missed_label(f),
                     "alpha without the lowest rung": "" if trimmed[f.model].curve is None
                     else f"{trimmed[f.model].curve.alpha:.3f}"})
    return pd.DataFrame(rows).fillna("")


def _inside_label(p: Prediction) -> str:
    return "no interval (one seed per budget)" if p.interval is None else ("yes" if p.inside else "no")


def held_out_table(predictions: dict[Form, dict[str, Prediction]]) -> pd.DataFrame:
    """One row per model and form that could predict its held-out rung; `closest`: the form with the
    smallest error for that model, where more than one form predicted it."""
    rows = []
    for name in sorted({name for found in predictions.values() for name in found}):
        made = [found[name] for found in predictions.values() if name in found]
        closest = min(made, key=lambda p: abs(p.error)).form if len(made) > 1 else None
        rows += [{"model": name, "held-out rung": f"{p.budget:.3g}", "form": p.form.name,
                  "predicted [95%]": f"{p.predicted:.3f}"
                  + ("" if p.interval is None else f" [{p.interval[0]:.3f}, {p.interval[1]:.3f}]"),
                  "observed mean": f"{p.observed:.3f}", "error": f"{p.error:+.3f}", "inside?": _inside_label(p),
                  "closest": "yes" if p.form is closest else ""} for p in made]
    return pd.DataFrame(rows)


def score_table(predictions: dict[Form, dict[str, Prediction]]) -> pd.DataFrame:
    """One row per form that could be tested, best first."""
    return pd.DataFrame([{"form": s.form.name, "formula": s.form.formula,
                          "models tested": len(predictions[s.form]), "compared on": len(s.models),
                          "mean absolute error": f"{s.mean_abs_error:.3f}", "mean error": f"{s.mean_error:+.3f}",
                          "inside 95% interval": f"{s.inside} of {len(s.models)}"} for s in scores(predictions)])


def _short(c: Crossover) -> str:
    return f"{c.compute:.3g}" if c.compute is not None else f"none, {c.model if c.ahead else c.reference} ahead"


def crossover_table(found: list[Crossover], trimmed: list[Crossover] | None,
                    scaling: ScalingFits | None = None) -> pd.DataFrame:
    """One row per crossover; `trimmed`: the same estimated without the lowest rung (None: no such
    column, for a form that does not fit the lowest rung); with `scaling`, a crossover whose
    held-out test failed reads "not predictable" beside its estimate."""
    again = {c.model: c for c in trimmed or []}
    rows = []
    for c in found:
        estimate = NO_CROSSING if c.compute is None else f"{c.compute:.3g}"
        reasons = [] if scaling is None else [why for why in (scaling.failure(c.model), scaling.failure(c.reference))
                                              if why]
        rows.append({"model": c.model, "against": c.reference,
                     "crossover FLOPs": f"{NOT_PREDICTABLE} (fit: {estimate})" if reasons else estimate,
                     "95% interval": "" if c.interval is None
                     else f"[{_bound(c.interval[0])}, {_bound(c.interval[1])}]",
                     "ahead above it": (c.model if c.ahead else c.reference)
                     + (" (throughout)" if c.compute is None else ""),
                     "replicates crossing": "" if c.crossed is None else f"{c.crossed:.0%}"}
                    | ({} if trimmed is None else {"without the lowest rung": _short(again[c.model])
                                                   if c.model in again else ""})
                    | ({} if scaling is None else {"held-out test": "; ".join(reasons) or "passed"}))
    return pd.DataFrame(rows)


def plot_fits(fits: dict[str, ModelFit], path: Path, title: str, colours: dict[str, tuple]) -> None:
    """Per fitted model: its mean bpb per budget and its curve, solid over the rungs it fits and
    dashed in the extrapolation up to EXTRAPOLATION x the top rung."""
    top = max(b for f in fits.values() for b in f.points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in fits.values():
        if f.curve is None:
            continue
        xs = sorted(f.points)
        ax.plot(xs, [np.mean(f.points[b]) for b in xs], "o", color=colours[f.model], label=f.model)
        inside, beyond = np.geomspace(min(f.budgets()), top, 100), np.geomspace(top, EXTRAPOLATION * top, 100)
        ax.plot(inside, f.curve(inside), "-", color=colours[f.model], linewidth=1)
        ax.plot(beyond, f.curve(beyond), "--", color=colours[f.model], linewidth=1)
    ax.axvline(top, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    save_plot(fig, ax, "training FLOPs (budget)", "test bits per byte", title, path)


def fits_section(scaling: ScalingFits, label: str, plot_dir: Path, colours: dict[str, tuple],
                 scaled_suite: bool, left_out: str = "") -> list[str]:
    """The report's "Scaling fits" lines for one corpus: nothing when no model has enough
    budgets, except one plain sentence for a suite built for fits (a scaling rule). `left_out`:
    a sentence on points the fits leave out (rows not at matched inference cost)."""
    fits = scaling.power_law
    most = max((len(f.points) for f in fits.values()), default=0)
    if most < MIN_BUDGETS:
        return [f"Scaling fits need at least {MIN_BUDGETS} budgets per model; these records have {most}, "
                "so no curve is fitted.", ""] if scaled_suite else []
    path = plot_dir / f"fits_{label}.png"
    plot_fits(scaling.best, path, f"{label}: {scaling.form.formula} per model, dashed beyond the top rung", colours)
    lines = ["### Scaling fits", "",
             f"Per model, L(C) = E + A C^-alpha fitted by least squares (scipy) to the mean test bpb at each budget C "
             f"(training FLOPs per run; E >= 0, A > 0, 0 < alpha <= {MAX_ALPHA:g}); 95% intervals from {RESAMPLES} "
             "bootstrap replicates that resample the seeds within every budget (with few seeds these run "
             "narrow: resampling n seeds understates their spread). A model needs "
             f"{MIN_BUDGETS} budgets for a fit. Rungs missed: of the rungs with two seeds or more, how many "
             "have a mean the curve misses by more than its 95% t-interval over seeds; a curve that misses "
             "rungs describes its points only roughly, and so do the crossovers read from it. Top rung: "
             "the curve minus the mean there (negative: the curve runs below the points)."
             + (f" {left_out}" if left_out else ""), "",
             fit_table(fits, without_lowest_rung(fits)).to_markdown(index=False, disable_numparse=True), "",
             *held_out_lines(scaling), *crossover_lines(scaling),
             f"![scaling fits with their extrapolation](plots/{path.name})", ""]
    return lines


def held_out_lines(scaling: ScalingFits) -> list[str]:
    """The held-out rung paragraph, its table per model and form, and the forms' scores."""
    if not scaling.scores:
        return ["No model has enough rungs below its top for a held-out prediction, so no form is tested.", ""]
    method = ("Each form is fitted to every rung of a model but the top and predicts the top rung's mean: "
              f"power law, {POWER_LAW.formula} (as above); curved, {CURVED.formula} (linear least squares on log "
              "bpb: a bend either way, where a power law with a floor only flattens); upper rungs, a pure power law "
              f"(E = 0) on the top {UPPER_RUNGS} rungs below the held-out one (leaving out the small models). The "
              "95% interval adds to the bootstrap over seeds of the fit the seed noise of the top rung's mean "
              "(Student t with the pooled seed standard deviation of the rungs below). Error: predicted minus "
              "observed; inside?: whether the observed mean falls in the interval; closest: the form with the "
              "smallest error for that model.")
    ranking = ("The forms compared on the models every tested form could predict, best (smallest mean absolute "
               f"error) first; the crossovers below use the best, {scaling.form.name}, fitted again with the top "
               "rung. A passed test vouches for one rung of extrapolation; a crossover further out is extrapolated "
               "further than any test reached.")
    return ["#### Held-out rung", "", method, "",
            held_out_table(scaling.predictions).to_markdown(index=False, disable_numparse=True), "", ranking, "",
            score_table(scaling.predictions).to_markdown(index=False, disable_numparse=True), ""]


def beyond_lines(scaling: ScalingFits, predictions: dict[Form, dict[str, Prediction]],
                 records: list[RunRecord]) -> list[str]:
    """The rung held out beyond the ladder (Suite.holdout; `records`, its runs): each form fitted
    to every ladder rung predicts it (`predictions`, predict_beyond); the table per model and form,
    the forms' scores, and which form the ladder's own held-out test had chosen. None without runs."""
    if not records:
        return []
    if not scores(predictions):
        return ["#### Beyond the ladder", "", "No row that ran the held-out rung has enough ladder rungs for a fit.",
                ""]
    return ["#### Beyond the ladder", "",
            f"The rung at {records[0].budget_flops:.3g} training FLOPs, run by {len({r.model.name for r in records})} "
            "rows and left out of every fit above, predicted by each form fitted to every ladder rung (intervals as in "
            "the held-out test, with this rung's seeds). The ladder's own held-out test chose "
            f"{scaling.form.name}; this is the test of that choice one rung further out.", "",
            held_out_table(predictions).to_markdown(index=False, disable_numparse=True), "",
            score_table(predictions).to_markdown(index=False, disable_numparse=True), ""]


def beyond_sentence(scaling: ScalingFits, predictions: dict[Form, dict[str, Prediction]]) -> str | None:
    """The summary's line on the rung beyond the ladder: how each form predicted it."""
    ranked = scores(predictions)
    if not ranked:
        return None
    budget = next(p.budget for found in predictions.values() for p in found.values())
    said = [f"{s.form.name} by {s.mean_abs_error:.3f} bpb on average ({s.inside} of {len(s.models)} inside the 95% "
            "interval)" for s in ranked]
    return (f"- Beyond the ladder, at {budget:.3g} training FLOPs (held out of every fit): the fits to all rungs "
            f"missed it, best first, {'; '.join(said)}. The ladder's held-out test had chosen {scaling.form.name}.")


def crossover_lines(scaling: ScalingFits) -> list[str]:
    """The crossover paragraph and table in the best form, or why there is none."""
    fits = scaling.best
    found = crossovers(fits)
    every_rung = scaling.form.top_rungs is None
    if found:
        return [f"Where each byte-level model's curve ({scaling.form.formula}) crosses {found[0].reference}'s: the "
                f"first crossing from the lowest rung both curves fit to {EXTRAPOLATION:g}x the top rung; a replicate "
                "without one counts as beyond that range. A crossover is predictable from these rungs only where "
                "this form's held-out prediction of both models' top rung fell inside its interval (held-out "
                "test)." + (" The column without the lowest rung fits every model again without it (point "
                            "estimates): how much the estimate leans on the smallest models." if every_rung else ""),
                "", crossover_table(found, crossovers(without_lowest_rung(fits)) if every_rung else None,
                                    scaling).to_markdown(index=False, disable_numparse=True), ""]
    if reference_model(fits) is None:
        return ["No BPE model in these records, so no crossover is estimated.", ""]
    if fits[reference_model(fits)].curve is None:
        return [f"{reference_model(fits)} has too few budgets for a fit, so no crossover is estimated.", ""]
    return []
