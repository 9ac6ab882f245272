"""The one trainer: AdamW (weight decay on matrices only), linear warmup then cosine
decay, gradient clipping, a fixed batch of windows per step, and a seed. Every
adapter trains through this loop (DESIGN.md section 5).

Long runs save a resumable state (model, optimizer, schedule, data position, RNG)
every `save_every_s` seconds; a run started again from that state continues
exactly where it stopped, so an interruption loses at most that much work.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from harness.api import Adapter
from harness.api.registry import load_state
from harness.core.data import TrainStream
from harness.core.device import autocast, synchronize
from harness.core.records import save_checkpoint_atomic
from harness.core.suite import TrainerSettings
from harness.modeling.flops import TRAIN_MULTIPLIER


def lr_factor(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, settings: TrainerSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)


def train(
    model: Adapter,
    stream: TrainStream,
    settings: TrainerSettings,
    steps: int,
    device: torch.device,
    description: str = "train",
    show_progress: bool = True,
    resume_path: Path | None = None,
    resume_key: str = "",
    save_every_s: float = 60.0,
    budget_flops: float | None = None,
) -> dict:
    """Train for `steps` optimizer steps. The objective is the mean NLL per byte plus the
    adapter's auxiliary training losses (Adapter.training_loss). Returns the loss curve (bits
    per byte of the training batches, and each auxiliary loss), training seconds and the
    epochs over the training split. With `resume_path`, a saved state whose `resume_key`
    matches is continued.

    An adapter whose cost moves during training (H-Net's learned chunk rate) reports the forward
    FLOPs each batch ran (TrainingLoss.forward_flops): each step is then charged
    TRAIN_MULTIPLIER x those, the curve records the FLOPs spent (and bytes per unit, when the
    adapter reports its units), and with `budget_flops` training stops after the step that
    leaves less budget than that step cost (like the floor() of a fixed-rate plan, it does not
    start a step the rest would not pay for at the last step's cost). `steps` stays the
    schedule's length: if the steps run out first, the rest of the budget is left unspent. An
    adapter that reports nothing runs exactly `steps` steps, whatever the budget."""
    model.train()
    optimizer = make_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, settings.warmup_fraction, settings.min_lr_ratio)
    )
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # clipped: only what is trained
    state = {"step": 0, "curve": [], "window_sum": 0.0, "window_count": 0, "auxiliary_sums": {}, "bytes_seen": 0,
             "seconds": 0.0, "flops": None, "window_units": 0}
    resumed_at = None
    if resume_path is not None and resume_path.exists():
        saved = load_state(resume_path, device)
        if saved.get("key") == resume_key and saved["state"]["step"] <= steps:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            stream.load_state_dict(saved["stream"])
            torch.set_rng_state(saved["rng"])
            state = saved["state"]
            state.setdefault("auxiliary_sums", {})
            state = {"flops": None, "window_units": 0} | state
            resumed_at = state["step"]
            tqdm.write(f"{description}: resuming at step {state['step']} of {steps}")

    def save() -> None:
        save_checkpoint_atomic(resume_path, {
            "key": resume_key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "stream": stream.state_dict(), "rng": torch.get_rng_state(),
            "state": state,
        })

    start = time.perf_counter() - state["seconds"]
    last_save = time.perf_counter()
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=description, unit="step",
               disable=not show_progress, leave=False, dynamic_ncols=True)
    stopped_by_budget = False
    for step in bar:
        batch = stream.next_batch().to(device, non_blocking=True)
        with autocast(device):
            out = model.training_loss(batch)
        nll = out.nll.float().mean()  # nats per byte over every byte of the batch
        loss = nll + sum(term.float() for term in out.auxiliary.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
        optimizer.step()
        schedule.step()
        value = nll.item()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step + 1}")
        state["step"] = step + 1
        state["bytes_seen"] += batch.numel()
        state["window_sum"] += value
        state["window_count"] += 1
        for name, term in out.auxiliary.items():
            state["auxiliary_sums"][name] = state["auxiliary_sums"].get(name, 0.0) + float(term.detach())
        if out.forward_flops is not None:  # the cost moves: charge what this step ran
            step_flops = TRAIN_MULTIPLIER * float(out.forward_flops)
            state["flops"] = (state["flops"] or 0.0) + step_flops
            stopped_by_budget = budget_flops is not None and budget_flops - state["flops"] < step_flops
        state["window_units"] += out.units or 0
        if (step + 1) % settings.log_every == 0 or step + 1 == steps or stopped_by_budget:
            count = state["window_count"]
            bpb = state["window_sum"] / count / math.log(2)
            point = {"step": step + 1, "bytes": state["bytes_seen"], "train_bpb": round(bpb, 5)}
            if state["auxiliary_sums"]:
                point["auxiliary"] = {name: round(total / count, 6) for name, total in state["auxiliary_sums"].items()}
            if state["flops"] is not None:
                point["flops"] = state["flops"]
            if state["window_units"]:
                point["bytes_per_unit"] = round(count * batch.numel() / state["window_units"], 5)
            state["curve"].append(point)
            bar.set_postfix(bpb=f"{bpb:.3f}", MB=f"{state['bytes_seen'] / 1e6:.2f}")
            state["window_sum"], state["window_count"], state["auxiliary_sums"], state["window_units"] = 0.0, 0, {}, 0
        if stopped_by_budget:
            break
        if resume_path is not None and time.perf_counter() - last_save >= save_every_s and step + 1 < steps:
            state["seconds"] = time.perf_counter() - start
            save()
            last_save = time.perf_counter()
    synchronize(device)
    return {
        "curve": state["curve"],
        "steps": state["step"],
        "flops": state["flops"],  # training FLOPs spent, when the adapter reports what it ran; else None
        "stopped_by_budget": stopped_by_budget,
        "seconds": time.perf_counter() - start,
        "bytes_seen": state["bytes_seen"],
        "epochs": state["bytes_seen"] / (stream.windows_per_epoch * stream.data.shape[1]),
        "resumed_at_step": resumed_at,
    }
