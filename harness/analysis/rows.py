"""How a report's rows differ besides their bpb: parameters (total, embedding and non-embedding,
seed means) and, per budget, the config keys (as sized) that differ between two rows of one adapter."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np

from harness.run.records import RunRecord

PARAMETER_COLUMNS = {"params": "total", "embedding params": "embedding", "non-embedding params": "non_embedding"}


def parameter_columns(runs: list[RunRecord]) -> dict[str, float]:
    """The seed means of a row's parameter counts, as table columns."""
    return {column: float(np.mean([r.parameters[key] for r in runs])) for column, key in PARAMETER_COLUMNS.items()}


def _millions(count: float) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e4 else f"{count:,.0f}"


def parameter_phrase(runs: list[RunRecord]) -> str:
    """E.g. "1.51M parameters: 1.19M embedding, 0.32M non-embedding" (seed means)."""
    p = parameter_columns(runs)
    return (f"{_millions(p['params'])} parameters: {_millions(p['embedding params'])} embedding, "
            f"{_millions(p['non-embedding params'])} non-embedding")


def parameter_phrases(records: list[RunRecord]) -> dict[tuple[float, str], str]:
    """(budget, row) -> its parameter phrase."""
    groups: dict[tuple[float, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.budget_flops, r.model.name), []).append(r)
    return {key: parameter_phrase(runs) for key, runs in groups.items()}


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys: entropy_model.d_model."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = object()  # a key one config has and the other has not


def _shown(value: object) -> str:
    return "absent" if value is _ABSENT else json.dumps(value) if isinstance(value, (list, type(None), bool)) else str(value)


def config_differences(records: list[RunRecord]) -> dict[float, list[str]]:
    """Per budget, one line per pair of rows of one adapter: the config keys whose values differ,
    from each row's lowest-seed record (its config as sized)."""
    differences: dict[float, list[str]] = {}
    for budget in sorted({r.budget_flops for r in records}):
        first: dict[str, RunRecord] = {}
        for r in sorted((r for r in records if r.budget_flops == budget), key=lambda r: -r.seed):
            first[r.model.name] = r
        for a, b in combinations(sorted(first.values(), key=lambda r: (r.model.adapter, r.model.name)), 2):
            if a.model.adapter != b.model.adapter:
                continue
            ca, cb = _flat(a.model.config), _flat(b.model.config)
            keys = [k for k in {**ca, **cb} if ca.get(k, _ABSENT) != cb.get(k, _ABSENT)]
            what = "; ".join(f"{k} {_shown(ca.get(k, _ABSENT))} / {_shown(cb.get(k, _ABSENT))}" for k in keys)
            differences.setdefault(budget, []).append(
                f"- `{a.model.name}` / `{b.model.name}` ({a.model.adapter}): {what or 'the same config'}")
    return differences


def differences_section(records: list[RunRecord]) -> list[str]:
    """The report's "how the rows differ" list, as markdown lines (none without two rows of one adapter)."""
    differences = config_differences(records)
    if not differences:
        return []
    lines = ["### How the rows differ", "",
             "Per budget, each pair of rows of one adapter and the config keys whose values differ (first / second "
             "row; the configs as sized, of each row's lowest seed). Parameters are in the table above.", ""]
    for budget, pairs in differences.items():
        lines += [f"At {budget:.3g} training FLOPs:", "", *pairs, ""]
    return lines
