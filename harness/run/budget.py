"""The one home of budget and FLOP-charging policy (docs/protocols.md, "FLOP convention" and
"Fairness"): what a byte costs at inference and in training (an auxiliary model's inference
counts once, and not at all when the suite excludes auxiliary FLOPs), how a budget becomes
optimizer steps after what preparation charged and what calibration after training will spend,
what a finished run is charged, and whether a run sized to an inference cost held it on the
windows it was scored on. The FLOP counts themselves are harness/modeling/flops.py."""

from __future__ import annotations

from dataclasses import dataclass

from harness.api import Adapter, Preparation, RunContext
from harness.errors import HarnessError
from harness.modeling.flops import TRAIN_MULTIPLIER, training_steps
from harness.run.distributed import log
from harness.run.records import CostCheck, EpochCap, FlopsPerByte, RunRecord
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
    calibration_flops: float  # reserved before training for the passes after it (Adapter.calibration_cost)
    batch_bytes: int
    steps: int
    epoch_cap: EpochCap | None = None  # the suite's max_epochs, when it cut the steps the budget bought
    warnings: tuple[str, ...] = ()

    @property
    def reserved_flops(self) -> float:
        """What training may not spend: preparation's charge and calibration's reserve."""
        return self.auxiliary_training_flops + self.calibration_flops


def plan(run: Run, model: Adapter, preparation: Preparation, ctx: RunContext, train_bytes: int,
         max_epochs: float | None = None) -> Plan:
    """The run's budget, less what preparation charged and what calibration after training will
    spend, in optimizer steps; at most `max_epochs` over the training split's windows. Warns when
    the data would repeat."""
    forward = model.flops_per_byte(ctx.window)
    auxiliary = preparation.auxiliary_flops if ctx.count_auxiliary_flops else 0.0
    calibration = model.calibration_cost(train_bytes, ctx.window).flops
    per_byte = training_flops_per_byte(forward, ctx.count_auxiliary_flops)
    batch_bytes = run.trainer.batch_windows * ctx.window
    left = run.budget - auxiliary - calibration
    steps = training_steps(left, per_byte, batch_bytes)
    if steps < 1:
        raise HarnessError(f"{run.run_id}: budget {run.budget:.3g} FLOPs leaves {left:.3g} after preparation "
                           f"({auxiliary:.3g}) and calibration ({calibration:.3g}), less than one optimizer step "
                           f"({per_byte * batch_bytes:.3g} FLOPs)")
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
    return Plan(forward, per_byte, auxiliary, calibration, batch_bytes, steps, cap, tuple(warnings))


def charged_training_flops(training: TrainingResult, plan: Plan) -> float:
    """What training is charged: the FLOPs each step reported it ran, for an adapter whose cost
    moves (a learned chunk rate), else the plan's fixed rate times the bytes trained."""
    return training.flops if training.flops is not None else plan.training_flops_per_byte * training.bytes_seen


def check_test_cost(flops: FlopsPerByte, sizing: dict | None, count_auxiliary: bool = True) -> CostCheck | None:
    """Whether a run sized to an inference cost held it where it was scored: the forward FLOPs per
    byte counted on the scored test windows (auxiliary models left out as the target leaves them
    out) against the sizing target, within the tolerance it was sized to (harness.run.sizing). A
    learned or data-dependent unit rate (H-Net's chunks, an entropy patcher's patches) can drift
    from the rate it was sized at. None for a run that was not sized, or a record without the
    test count."""
    if sizing is None or flops.test is None:
        return None
    target = sizing["target_flops_per_byte"]
    test = inference_flops_per_byte({"total": flops.test, "auxiliary": flops.analytic.get("auxiliary", 0.0)},
                                    count_auxiliary)
    error, tolerance = test / target - 1.0, sizing["tolerance"]
    return CostCheck(target=target, test=test, relative_error=error, tolerance=tolerance, matched=abs(error) <= tolerance)


def cost_check_of(record: RunRecord) -> CostCheck | None:
    """A record's cost check; a record from before the check was written gets the same judgement
    from its own figures."""
    return record.cost_check or check_test_cost(record.flops_per_byte, record.sizing, record.count_auxiliary_flops)
