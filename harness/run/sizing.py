"""Matched inference cost: size a model so its forward FLOPs per byte land within 5%
of a suite's target (`inference_flops_per_byte`).

The rule is the same for every adapter; what differs is which fields it may change,
declared by the adapter as `sizing` (SizingFields): its widths (the main one first:
d_model for bytes and token models, d_global / d_main for the hierarchical ones, then
their local widths) and the main model's depth (n_layers / global_layers / main_layers).
Everything else (vocabulary, patch size, local depths, an auxiliary entropy model) stays.

1. Keep the configured depth; try every main width that is a multiple of 2 x its heads
   (so each head has an even width, as RoPE needs). Every other width grows by the same
   factor, main width / configured main width, rounded to the nearest multiple of 2 x its
   own heads, so the configured ratios hold within rounding. Take the closest to the target.
2. If none is within 5%, try every depth from 1 to MAX_DEPTH with every width, and take
   the closest pair, preferring the depth nearest the configured one.
3. If still none is within 5%, the target cannot be met: the error names the model
   and the closest cost it can reach.

`widths="main"` is the rule before every width grew: only the main width changes and the
other widths keep their configured values. Suites whose records were made with it declare
`sizing: {widths: main}` (harness/run/spec.py), so those records stay reproducible.

Cost per byte of a token or patch model depends on what prepare() learned (bytes per
token, patch rate), so sizing runs on a prepared model, and the resized model takes
over that preparation (Adapter.carry_preparation) instead of preparing again.
"""

from __future__ import annotations

import copy

from pydantic import ValidationError

from harness.errors import HarnessError
from harness.api import Adapter, AdapterConfig, SizingFields
from harness.run import budget

class TargetOutOfReach(HarnessError):
    """No allowed size of a model meets the inference target (or the model cannot be sized)."""


TOLERANCE = 0.05
MAX_WIDTH = 4096
MAX_DEPTH = 24


def inference_flops_per_byte(model: Adapter, window: int, count_auxiliary: bool = True) -> float:
    """Forward FLOPs per byte of `model` for windows of `window` bytes (harness/run/budget.py's rule)."""
    return budget.inference_flops_per_byte(model.flops_per_byte(window), count_auxiliary)


def _cost(model: Adapter, config: AdapterConfig, window: int, count_auxiliary: bool) -> float:
    """Cost of `model` with another config, without building it: flops_per_byte reads only
    the config and the prepared state, so a shallow copy with the new config answers."""
    probe = copy.copy(model)
    probe.config = config
    return inference_flops_per_byte(probe, window, count_auxiliary)


def _step(config: dict, heads: str | None) -> int:
    """What a width must be a multiple of: 2 x its heads (heads of even width, for RoPE), or 1."""
    return 2 * config[heads] if heads else 1


def _grown_widths(fields: SizingFields, configured: dict, width: int, widths: str) -> dict[str, int]:
    """Every width for the main width `width`: the others grown by the same factor and rounded
    to their own step (at least one step), or kept as configured when `widths` is "main"."""
    grown = {fields.width: width}
    for name, heads in fields.other_widths.items():
        if widths == "main":
            grown[name] = configured[name]
            continue
        step = _step(configured, heads)
        grown[name] = max(step, step * round(configured[name] * width / configured[fields.width] / step))
    return grown


def _candidates(model: Adapter, depth: int, target: float, window: int, count_auxiliary: bool, widths: str):
    """(relative error, width, config, cost) for each valid main width at `depth`, in increasing
    width, stopping once the cost passes the target's upper tolerance (cost grows with width)."""
    fields = model.sizing
    base = model.config.model_dump()
    for width in range(_step(base, fields.heads), MAX_WIDTH + 1, _step(base, fields.heads)):
        try:
            config = model.Config(**{**base, **_grown_widths(fields, base, width, widths), fields.depth: depth})
        except (ValidationError, ValueError):
            continue  # e.g. below a field's minimum width
        cost = _cost(model, config, window, count_auxiliary)
        yield abs(cost / target - 1.0), width, config, cost
        if cost > target * (1.0 + TOLERANCE):
            return


def size_to_target(model: Adapter, target: float, window: int, count_auxiliary: bool = True,
                   label: str | None = None, widths: str = "all") -> tuple[AdapterConfig, dict]:
    """The config that meets `target` forward FLOPs per byte (see the module rule; `widths`:
    "all" grows every width, "main" only the main one), and facts for the run record.
    `model` must be prepared (its cost per byte known)."""
    fields = model.sizing
    label = label or model.name
    if fields is None:
        raise TargetOutOfReach(f"model {label!r}: adapter {model.name!r} declares no sizing fields, so it cannot be "
                           "sized to an inference cost")
    if widths not in ("all", "main"):
        raise HarnessError(f"model {label!r}: sizing widths must be 'all' or 'main', not {widths!r}")
    named = ", ".join(fields.widths() if widths == "all" else [fields.width])  # the widths the rule grows
    configured = model.config.model_dump()
    depth0 = configured[fields.depth]

    def search(depth: int):
        return _candidates(model, depth, target, window, count_auxiliary, widths)

    best = min(search(depth0), default=None, key=lambda c: c[0])
    rule = f"width ({named}) at the configured depth"
    if best is None or best[0] > TOLERANCE:
        rule = f"width ({named}) and depth ({fields.depth})"
        options = [(error, abs(depth - depth0), width, config, cost)
                   for depth in range(1, MAX_DEPTH + 1) for error, width, config, cost in search(depth)]
        if not options:
            raise TargetOutOfReach(f"model {label!r} ({model.name}): no valid {fields.width} <= {MAX_WIDTH}")
        within = [o for o in options if o[0] <= TOLERANCE]
        pick = min(within, key=lambda o: (o[1], o[0])) if within else min(options, key=lambda o: o[0])
        best = (pick[0], pick[2], pick[3], pick[4])
    error, _, config, cost = best
    chosen = config.model_dump()
    if error > TOLERANCE:
        raise TargetOutOfReach(
            f"model {label!r} ({model.name}): no {fields.width} <= {MAX_WIDTH} and {fields.depth} <= {MAX_DEPTH} "
            f"gives {target:.4g} forward FLOPs/byte within {TOLERANCE:.0%}; the closest is {cost:.4g} "
            f"({fields.width}={chosen[fields.width]}, {fields.depth}={chosen[fields.depth]})")
    every = list(fields.widths()) + [fields.depth]  # the record shows every width, grown or kept
    return config, {
        "target_flops_per_byte": target,
        "achieved_flops_per_byte": cost,
        "relative_error": cost / target - 1.0,
        "tolerance": TOLERANCE,
        "rule": rule,
        "widths": widths,
        "configured": {**{k: configured[k] for k in every},
                       "flops_per_byte": inference_flops_per_byte(model, window, count_auxiliary)},
        "chosen": {k: chosen[k] for k in every},
    }


def resize(model: Adapter, config: AdapterConfig) -> Adapter:
    """A new model of the same adapter with `config`, carrying over `model`'s preparation."""
    resized = type(model)(config)
    resized.carry_preparation(model)  # copy_ and load_state_dict work across devices
    return resized
