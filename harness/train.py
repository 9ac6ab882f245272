"""The one trainer: AdamW (weight decay on matrices only), linear warmup then cosine
decay, gradient clipping, a fixed batch of windows per step, and a seed. Every
adapter trains through this loop (DESIGN.md section 5)."""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from harness.data import TrainStream
from harness.evaluate import autocast
from harness.registry import Adapter
from harness.suite import TrainerSettings


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
) -> dict:
    """Train for `steps` optimizer steps. Returns the loss curve (bits per byte of the
    training batches), wall time and the number of epochs over the training split."""
    model.train()
    optimizer = make_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, settings.warmup_fraction, settings.min_lr_ratio)
    )
    curve, window_sum, window_count = [], 0.0, 0
    bytes_seen = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=description, unit="step", disable=not show_progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = stream.next_batch().to(device, non_blocking=True)
        with autocast(device):
            nll = model(batch)
        loss = nll.float().mean()  # nats per byte over every byte of the batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        bytes_seen += batch.numel()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step + 1}")
        window_sum += value
        window_count += 1
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            bpb = window_sum / window_count / math.log(2)
            curve.append({"step": step + 1, "bytes": bytes_seen, "train_bpb": round(bpb, 5)})
            bar.set_postfix(bpb=f"{bpb:.3f}", MB=f"{bytes_seen / 1e6:.2f}")
            window_sum, window_count = 0.0, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "curve": curve,
        "seconds": seconds,
        "bytes_seen": bytes_seen,
        "epochs": bytes_seen / (stream.windows_per_epoch * batch.shape[1]),
    }
