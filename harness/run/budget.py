"""The one home of budget and FLOP-charging policy (docs/protocols.md, "FLOP convention" and
"Fairness"): what a byte costs at inference and in training (an auxiliary model's inference
counts once, and not at all when the suite excludes auxiliary FLOPs), how a budget becomes
optimizer steps after what preparation charged, and what a finished run is charged.
The FLOP counts themselves are harness/modeling/flops.py."""

from __future__ import annotations

from dataclasses import dataclass

from harness.api import Adapter, Preparation, RunContext
from harness.errors import HarnessError
from harness.modeling.flops import TRAIN_MULTIPLIER, training_steps
from harness.run.distributed import log
from harness.run.records import EpochCap
from harness.run.spec import Run
from harness.run.train import TrainingResult


def inference_flops_per_byte(forward: dict[str, float], count_auxiliary: bool = True) -> float:
    """Forward FLOPs per byte from an adapter's breakdown, its auxiliary model's inference (an
    "auxiliary" entry, e.g. BLT's entropy model) left out when the suite does not count it."""
    return forward["total"] - (0.0 if count_auxiliary else forward.get("auxiliary", 0.0))


def training_flops_per_byte(forward: dict[str, float], count_auxiliary: bool = True) -> float:
    """Training FLOPs per byte: TRAIN_MULTIPLIER x forward for the trained model; a frozen
    auxiliary model runs forward only, so it counts once (and not at all when excluded)."""
    auxiliary = forward.get("auxiliary", 0.0)
    return TRAIN_MULTIPLIER * (forward["total"] - auxiliary) + (auxiliary if count_auxiliary else 0.0)


@dataclass(frozen=True)
class Plan:
    forward_flops_per_byte: dict[str, float]
    training_flops_per_byte: float
    auxiliary_training_flops: float  # charged to the budget before training
    batch_bytes: int
    steps: int
    epoch_cap: EpochCap | None = None  # the suite's max_epochs, when it cut the steps the budget bought
    warnings: tuple[str, ...] = ()


def plan(run: Run, model: Adapter, preparation: Preparation, ctx: RunContext, train_bytes: int,
         max_epochs: float | None = None) -> Plan:
    """The run's budget, less what preparation charged, in optimizer steps; at most `max_epochs`
    over the training split's windows. Warns when the data would repeat."""
    forward = model.flops_per_byte(ctx.window)
    auxiliary = preparation.auxiliary_flops if ctx.count_auxiliary_flops else 0.0
    per_byte = training_flops_per_byte(forward, ctx.count_auxiliary_flops)
    batch_bytes = run.trainer.batch_windows * ctx.window
    steps = training_steps(run.budget - auxiliary, per_byte, batch_bytes)
    if steps < 1:
        raise HarnessError(f"{run.run_id}: budget {run.budget:.3g} FLOPs leaves {run.budget - auxiliary:.3g} after "
                           f"preparation, less than one optimizer step ({per_byte * batch_bytes:.3g} FLOPs)")
    epoch_bytes = train_bytes // ctx.window * ctx.window
    epochs = steps * batch_bytes / epoch_bytes
    cap, warnings = None, []
    if max_epochs is not None and epochs > max_epochs:
        cap = EpochCap(max_epochs=max_epochs, budget_steps=steps)
        steps = max(1, int(max_epochs * epoch_bytes // batch_bytes))
        warnings.append(f"the budget buys {epochs:.3g} epochs over the training split; max_epochs {max_epochs:g} "
                        f"stops it at step {steps} of {cap.budget_steps} ({steps / cap.budget_steps:.1%} of the budget)")
    elif epochs > 1:
        warnings.append(f"the budget buys {epochs:.3g} epochs over the training split (the data repeats; a suite's "
                        "max_epochs caps it)")
    for warning in warnings:
        log(f"warning: {run.run_id}: {warning}")
    return Plan(forward, per_byte, auxiliary, batch_bytes, steps, cap, tuple(warnings))


def charged_training_flops(training: TrainingResult, plan: Plan) -> float:
    """What training is charged: the FLOPs each step reported it ran, for an adapter whose cost
    moves (a learned chunk rate), else the plan's fixed rate times the bytes trained."""
    return training.flops if training.flops is not None else plan.training_flops_per_byte * training.bytes_seen
