"""Scaling fits: per model, test bpb against training compute, L(C) = E + A * C^-alpha (scipy),
with 95% intervals by bootstrap over seeds, and the compute where each byte-level model's
curve crosses BPE's.

- Points: C is a run's budget (training FLOPs per run, the rung); a model's curve is fitted
  to its mean test bpb at each budget, so every rung weighs the same whatever its seeds.
- Parametrisation: L = E + a * (C / C_ref)^-alpha with C_ref the geometric mean of the
  budgets, so `a` is a bpb and the problem is well scaled; A = a * C_ref^alpha. For a fixed
  alpha the model is linear in (E, a): a grid over alpha with E >= 0 and a >= 0 gives the
  start, scipy's least_squares refines all three within E >= 0, a > 0, 0 < alpha <= MAX_ALPHA.
- At least MIN_BUDGETS distinct budgets: three parameters need a fourth point to be tested.
- Intervals: 95% percentile bootstrap; each replicate resamples the seeds within every budget
  (with replacement) and fits again. With one seed at every budget there is nothing to
  resample and no interval. With few seeds they run narrow: resampling n values understates
  their variance by (n - 1) / n (a simulation of 25 draws with 3 seeds: 22 covered a crossover).
- Goodness of fit: the rungs whose mean the fitted curve misses by more than the 95%
  Student-t interval over that rung's seeds. A power law that describes the points passes
  inside nearly all of them; a miss means the points bend (a learning rate that changes between
  rungs, a floor the range does not show), and the crossovers read from such a curve are rough.
- Crossover: the first C from the lowest rung up to EXTRAPOLATION x the top rung where a
  byte-level model's fitted curve meets BPE's (brentq on the difference, in log C). A
  bootstrap replicate without a crossing counts as beyond that range, so an interval's upper
  end may read "beyond 100x the top rung". Without a crossing, which model leads over the whole
  range is said too: "no crossing" alone would read as "never ahead".
- Sensitivity: the crossovers are estimated again without the lowest rung (point estimates),
  because the smallest models weigh on a short power law as much as the largest.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
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
EXTRAPOLATION = 100.0  # crossings are sought up to this factor above the top rung
RESAMPLES = 1000
CONFIDENCE = 0.95
NO_CROSSING = f"no crossing within {EXTRAPOLATION:g}x of the top rung"
_ALPHA_GRID = np.geomspace(1e-3, MAX_ALPHA, 80)


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
    c_ref = float(np.exp(np.log(c).mean()))
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


def crossing(model: Curve, reference: Curve, low: float, high: float) -> float | None:
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
    curve: Curve | None = None  # None: fewer than MIN_BUDGETS budgets
    replicates: list[Curve] = field(default_factory=list)  # bootstrap fits; empty with one seed per budget

    def interval(self, parameter: str) -> tuple[float, float] | None:
        return _interval([getattr(r, parameter) for r in self.replicates])

    def residual(self) -> float:
        budgets = sorted(self.points)
        means = [np.mean(self.points[b]) for b in budgets]
        return float(np.sqrt(np.mean((self.curve(budgets) - means) ** 2)))

    def missed(self) -> list[float] | None:
        """The budgets whose mean the curve misses by more than their 95% t-interval over seeds
        (None when no budget has two seeds: nothing to judge a miss by)."""
        judged = {b: seed_interval(v) for b, v in sorted(self.points.items()) if len(v) >= 2}
        if not judged:
            return None
        return [b for b, (_, low, high) in judged.items() if not low <= float(self.curve(b)) <= high]


def fit_model(model: str, adapter: str, kind: str, points: dict[float, list[float]],
              resamples: int = RESAMPLES) -> ModelFit:
    """The fit of one model's points and its bootstrap over seeds (seeded by the model's name,
    so a report is the same every time it is made)."""
    fitted = ModelFit(model, adapter, kind, points)
    if len(points) < MIN_BUDGETS:
        return fitted
    budgets = sorted(points)
    fitted.curve = fit_curve(budgets, [np.mean(points[b]) for b in budgets])
    if resamples == 0 or all(len(points[b]) < 2 for b in budgets):
        return fitted
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    means = np.stack([np.asarray(points[b])[rng.integers(0, len(points[b]), (resamples, len(points[b])))].mean(1)
                      for b in budgets], axis=1)  # (resamples, budgets)
    fitted.replicates = [fit_curve(budgets, row) for row in means]
    return fitted


def fit_records(records: list[RunRecord], kinds: dict[str, str], resamples: int = RESAMPLES) -> dict[str, ModelFit]:
    """Per model name (sorted), its fit over the records' budgets (one corpus's records)."""
    points: dict[str, dict[float, list[float]]] = {}
    adapters = {}
    for r in sorted(records, key=lambda r: (r.model.name, r.budget_flops, r.seed)):
        points.setdefault(r.model.name, {}).setdefault(r.budget_flops, []).append(r.test.bpb)
        adapters[r.model.name] = r.model.adapter
    return {name: fit_model(name, adapters[name], kinds[name], p, resamples) for name, p in points.items()}


def without_lowest_rung(fits: dict[str, ModelFit]) -> dict[str, ModelFit]:
    """The same models fitted again without the lowest rung (point estimates, no bootstrap)."""
    lowest = min(b for f in fits.values() for b in f.points)
    return {name: fit_model(name, f.adapter, f.kind, {b: v for b, v in f.points.items() if b != lowest}, resamples=0)
            for name, f in fits.items()}


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
    """Each fitted byte-level (tokenizer-free) model against the fitted BPE model."""
    name = reference_model(fits)
    if name is None or fits[name].curve is None:
        return []
    reference = fits[name]
    budgets = [b for f in fits.values() for b in f.points]
    low, high = min(budgets), EXTRAPOLATION * max(budgets)
    found = []
    for f in fits.values():
        if f.kind != "tokenizer-free" or f.curve is None:
            continue
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
            return (f"{c.model}: ahead of {c.reference} from the lowest rung to {EXTRAPOLATION:g}x the top rung, "
                    "no crossing")
        return f"{c.model}: {NO_CROSSING}"
    side = f"{c.model} ahead" if c.ahead else f"{c.reference} ahead"
    interval = "" if c.interval is None else f" [95%: {_bound(c.interval[0])}, {_bound(c.interval[1])}]"
    return f"{c.model} crosses {c.reference} at {c.compute:.3g} training FLOPs{interval}, {side} above it"


def summary_sentence(fits: dict[str, ModelFit]) -> str | None:
    """The generated summary's sentence on the fitted crossovers (None when nothing was fitted)."""
    found = crossovers(fits)
    if not found:
        return None
    fitted = [f for f in fits.values() if f.curve is not None]
    rough = sum(bool(f.missed()) for f in fitted)
    caveat = (f" {rough} of {len(fitted)} fits pass outside the 95% seed interval of at least one rung's mean, so "
              "these points bend away from a power law and the crossovers read from them are rough (fits table)."
              if rough else "")
    trimmed = crossovers(without_lowest_rung(fits))
    sensitivity = (" Fitted without the lowest rung: " + "; ".join(describe(c) for c in trimmed) + "."
                   if trimmed else "")
    return ("- Fitted crossovers (L = E + A C^-alpha per model): " + "; ".join(describe(c) for c in found) + "."
            + caveat + sensitivity)


def _format_interval(interval: tuple[float, float] | None, fmt: str) -> str:
    return "one seed per budget" if interval is None else f"[{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def missed_label(f: ModelFit) -> str:
    missed = f.missed()
    judged = sum(len(v) >= 2 for v in f.points.values())
    return "one seed per budget" if missed is None else f"{len(missed)} of {judged}"


def fit_table(fits: dict[str, ModelFit], trimmed: dict[str, ModelFit]) -> pd.DataFrame:
    """One row per model; `trimmed`: the same models fitted without the lowest rung."""
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


def _short(c: Crossover) -> str:
    return f"{c.compute:.3g}" if c.compute is not None else f"none, {c.model if c.ahead else c.reference} ahead"


def crossover_table(found: list[Crossover], trimmed: list[Crossover]) -> pd.DataFrame:
    """One row per crossover; `trimmed`: the same estimated without the lowest rung."""
    again = {c.model: c for c in trimmed}
    rows = [{"model": c.model, "against": c.reference,
             "crossover FLOPs": NO_CROSSING if c.compute is None else f"{c.compute:.3g}",
             "95% interval": "" if c.interval is None else f"[{_bound(c.interval[0])}, {_bound(c.interval[1])}]",
             "ahead above it": (c.model if c.ahead else c.reference) + (" (throughout)" if c.compute is None else ""),
             "replicates crossing": "" if c.crossed is None else f"{c.crossed:.0%}",
             "without the lowest rung": _short(again[c.model]) if c.model in again else ""} for c in found]
    return pd.DataFrame(rows)


def plot_fits(fits: dict[str, ModelFit], path: Path, title: str, colours: dict[str, tuple]) -> None:
    """Per fitted model: its mean bpb per budget and its curve, solid over the rungs and dashed
    in the extrapolation up to EXTRAPOLATION x the top rung."""
    budgets = [b for f in fits.values() for b in f.points]
    low, top = min(budgets), max(budgets)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in fits.values():
        if f.curve is None:
            continue
        xs = sorted(f.points)
        ax.plot(xs, [np.mean(f.points[b]) for b in xs], "o", color=colours[f.model], label=f.model)
        inside, beyond = np.geomspace(low, top, 100), np.geomspace(top, EXTRAPOLATION * top, 100)
        ax.plot(inside, f.curve(inside), "-", color=colours[f.model], linewidth=1)
        ax.plot(beyond, f.curve(beyond), "--", color=colours[f.model], linewidth=1)
    ax.axvline(top, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    save_plot(fig, ax, "training FLOPs (budget)", "test bits per byte", title, path)


def fits_section(fits: dict[str, ModelFit], label: str, plot_dir: Path, colours: dict[str, tuple],
                 scaled_suite: bool, left_out: str = "") -> list[str]:
    """The report's "Scaling fits" lines for one corpus: nothing when no model has enough
    budgets, except one plain sentence for a suite built for fits (a scaling rule). `left_out`:
    a sentence on points the fits leave out (rows not at matched inference cost)."""
    most = max((len(f.points) for f in fits.values()), default=0)
    if most < MIN_BUDGETS:
        return [f"Scaling fits need at least {MIN_BUDGETS} budgets per model; these records have {most}, "
                "so no curve is fitted.", ""] if scaled_suite else []
    path = plot_dir / f"fits_{label}.png"
    plot_fits(fits, path, f"{label}: E + A C^-alpha per model, dashed beyond the top rung", colours)
    trimmed = without_lowest_rung(fits)
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
             fit_table(fits, trimmed).to_markdown(index=False, disable_numparse=True), ""]
    found = crossovers(fits)
    if found:
        lines += [f"Where each byte-level model's curve crosses {found[0].reference}'s: the first crossing from the "
                  f"lowest rung to {EXTRAPOLATION:g}x the top rung; a replicate without one counts as beyond that "
                  "range. The last column fits every model again without the lowest rung (point estimates): "
                  "how much the estimate leans on the smallest models.", "",
                  crossover_table(found, crossovers(trimmed)).to_markdown(
                      index=False, disable_numparse=True), ""]
    elif reference_model(fits) is None:
        lines += ["No BPE model in these records, so no crossover is estimated.", ""]
    elif fits[reference_model(fits)].curve is None:
        lines += [f"{reference_model(fits)} has too few budgets for a fit, so no crossover is estimated.", ""]
    lines += [f"![scaling fits with their extrapolation](plots/{path.name})", ""]
    return lines
