"""Matched inference cost: size a model so its forward FLOPs per byte land within 5%
of a suite's target (`inference_flops_per_byte`).

The rule is the same for every adapter; what differs is which fields it may change,
declared by the adapter as `sizing` (SizingFields): the main model's width and depth
(d_model / n_layers for bytes and token models, d_global / global_layers for the
hierarchical ones). Everything else (vocabulary, patch size, local models) stays.

1. Keep the configured depth; try every width that is a multiple of 2 x heads (so
   each head has an even width, as RoPE needs) and take the one closest to the target.
2. If none is within 5%, try every depth from 1 to MAX_DEPTH with every width, and take
   the closest pair, preferring the depth nearest the configured one.
3. If still none is within 5%, the target cannot be met: the error names the model
   and the closest cost it can reach.

Cost per byte of a token or patch model depends on what prepare() learned (bytes per
token, patch rate), so sizing runs on a prepared model, and the resized model takes
over that preparation (Adapter.carry_preparation) instead of preparing again.
"""

from __future__ import annotations

import copy

from pydantic import ValidationError

from harness.errors import HarnessError
from harness.api import Adapter, AdapterConfig
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


def _candidates(model: Adapter, depth: int, target: float, window: int, count_auxiliary: bool):
    """(relative error, width, config, cost) for each valid width at `depth`, in increasing
    width, stopping once the cost passes the target's upper tolerance (cost grows with width)."""
    fields = model.sizing
    base = model.config.model_dump()
    step = 2 * base[fields.heads]
    for width in range(step, MAX_WIDTH + 1, step):
        try:
            config = model.Config(**{**base, fields.width: width, fields.depth: depth})
        except (ValidationError, ValueError):
            continue  # e.g. below a field's minimum width
        cost = _cost(model, config, window, count_auxiliary)
        yield abs(cost / target - 1.0), width, config, cost
        if cost > target * (1.0 + TOLERANCE):
            return


def size_to_target(model: Adapter, target: float, window: int, count_auxiliary: bool = True,
                   label: str | None = None) -> tuple[AdapterConfig, dict]:
    """The config that meets `target` forward FLOPs per byte (see the module rule), and
    facts for the run record. `model` must be prepared (its cost per byte known)."""
    fields = model.sizing
    label = label or model.name
    if fields is None:
        raise TargetOutOfReach(f"model {label!r}: adapter {model.name!r} declares no sizing fields, so it cannot be "
                           "sized to an inference cost")
    configured = model.config.model_dump()
    depth0 = configured[fields.depth]
    best = min(_candidates(model, depth0, target, window, count_auxiliary), default=None, key=lambda c: c[0])
    rule = f"width ({fields.width}) at the configured depth"
    if best is None or best[0] > TOLERANCE:
        rule = f"width ({fields.width}) and depth ({fields.depth})"
        options = [(error, abs(depth - depth0), width, config, cost)
                   for depth in range(1, MAX_DEPTH + 1)
                   for error, width, config, cost in _candidates(model, depth, target, window, count_auxiliary)]
        if not options:
            raise TargetOutOfReach(f"model {label!r} ({model.name}): no valid {fields.width} <= {MAX_WIDTH}")
        within = [o for o in options if o[0] <= TOLERANCE]
        pick = min(within, key=lambda o: (o[1], o[0])) if within else min(options, key=lambda o: o[0])
        best = (pick[0], pick[2], pick[3], pick[4])
    error, _, config, cost = best
    if error > TOLERANCE:
        chosen = config.model_dump()
        raise TargetOutOfReach(
            f"model {label!r} ({model.name}): no {fields.width} <= {MAX_WIDTH} and {fields.depth} <= {MAX_DEPTH} "
            f"gives {target:.4g} forward FLOPs/byte within {TOLERANCE:.0%}; the closest is {cost:.4g} "
            f"({fields.width}={chosen[fields.width]}, {fields.depth}={chosen[fields.depth]})")
    chosen = config.model_dump()
    return config, {
        "target_flops_per_byte": target,
        "achieved_flops_per_byte": cost,
        "relative_error": cost / target - 1.0,
        "tolerance": TOLERANCE,
        "rule": rule,
        "configured": {fields.width: configured[fields.width], fields.depth: depth0,
                       "flops_per_byte": inference_flops_per_byte(model, window, count_auxiliary)},
        "chosen": {fields.width: chosen[fields.width], fields.depth: chosen[fields.depth]},
    }


def resize(model: Adapter, config: AdapterConfig) -> Adapter:
    """A new model of the same adapter with `config`, carrying over `model`'s preparation."""
    resized = type(model)(config)
    resized.carry_preparation(model)  # copy_ and load_state_dict work across devices
    return resized
