"""The one trainer: AdamW (weight decay on matrices only), linear warmup then cosine
decay, gradient clipping, a fixed batch of windows per step, and a seed. Every
adapter trains through this loop (docs/protocols.md, "4. One trainer, one evaluator").

Long runs save a resumable state (model, optimizer, schedule, data position, RNG)
every `save_every_s` seconds; a run started again from that state continues
exactly where it stopped, so an interruption loses at most that much work.

Progress: a tqdm bar on a terminal; when stderr is not a terminal (a log file, a pipe) a
plain line every PLAIN_PROGRESS_EVERY_S seconds instead, so logs hold no carriage-return
updates. With a TensorBoard writer, every loss-curve point also goes to TensorBoard
(train bpb, auxiliary losses, learning rate, bytes per second).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from harness.api import Adapter
from harness.api.registry import load_state
from harness.core import distributed
from harness.core.data import TrainStream
from harness.core.device import autocast, synchronize, to_device
from harness.core.records import save_checkpoint_atomic
from harness.core.suite import TrainerSettings
from harness.errors import HarnessError
from harness.modeling.flops import TRAIN_MULTIPLIER


class Diverged(FloatingPointError):
    """The training loss stopped being finite at `step`; `last_finite_loss` is that of the step before."""

    def __init__(self, step: int, last_finite_loss: float | None, loss: float):
        super().__init__(f"training loss became {loss} at step {step}")
        self.step, self.last_finite_loss = step, last_finite_loss

PLAIN_PROGRESS_EVERY_S = 30.0  # seconds between plain progress lines when stderr is not a terminal


TENSORBOARD_MISSING = ("--tensorboard needs the optional tensorboard package "
                       "(pip install 'tokenizer-harness[tensorboard]'); training without TensorBoard logs")


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (raises without the tensorboard package)
    except ImportError:
        return False
    return True


def tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter writing to log_dir (needs the optional tensorboard package)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


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
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, **adamw_options(decay + no_decay))


def adamw_options(parameters: list[torch.Tensor]) -> dict:
    """Fused AdamW (one kernel over all parameters instead of several per tensor) when every
    parameter is on CUDA; torch's default elsewhere (the CPU's fused kernel is not faster here)."""
    return {"fused": True} if parameters and all(p.device.type == "cuda" for p in parameters) else {}


def training_forward(model: Adapter, device: torch.device, settings: TrainerSettings):
    """The trainer's forward, batch -> TrainingLoss: the adapter's training_loss (through DDP
    across processes), compiled with torch.compile when the settings ask. Only the training
    call is compiled: evaluation and the FLOP count stay eager."""
    forward = distributed.wrap(model, device)
    return torch.compile(forward) if settings.compile else forward


def objective(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL per byte over every byte of the batch, the loss trained on: it plus the
    adapter's auxiliary losses)."""
    nll = out.nll.float().mean()
    return nll, nll + sum(term.float() for term in out.auxiliary.values())


STATE_KEYS = ("key", "model", "optimizer", "schedule", "stream", "rng", "state")


def saved_state(path: Path, key: str, steps: int, model: Adapter, optimizer: torch.optim.Optimizer,
                device: torch.device, description: str) -> dict | None:
    """The training state saved at `path` if it continues this run (its `key` is the run's), else
    None. A file that cannot be loaded, or does not fit the model and optimizer, is deleted with
    a warning and the run starts over; a state of another config is left to be overwritten."""
    if not path.exists():
        return None
    try:
        saved = load_state(path, device)
    except HarnessError as e:
        problem = str(e)
    else:
        if saved.get("key") != key:
            return None
        problem = _misfit(saved, steps, model, optimizer)
        if problem is None:
            return saved
        problem = f"{path}: {problem}"
    tqdm.write(f"warning: {description}: {problem}; deleted it, the run starts over")
    path.unlink(missing_ok=True)
    return None


def _misfit(saved: dict, steps: int, model: Adapter, optimizer: torch.optim.Optimizer) -> str | None:
    """Why `saved` cannot continue this run's training, or None. Checked before anything is
    loaded, so a bad file never leaves the model half overwritten."""
    missing = [k for k in STATE_KEYS if k not in saved]
    if missing:
        return f"not a training state (no {', '.join(missing)})"
    state, stream = saved["state"], saved["stream"]
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and 0 <= state["step"] <= steps
            and isinstance(state.get("curve"), list)):
        return f"its training progress does not fit a run of {steps} steps"
    expected = model.state_dict()
    weights = saved["model"]
    if not isinstance(weights, dict) or set(weights) != set(expected) or any(
            torch.is_tensor(v) and (not torch.is_tensor(weights[k]) or weights[k].shape != v.shape)
            for k, v in expected.items()):
        return "its weights do not fit the model"
    groups = saved["optimizer"].get("param_groups") if isinstance(saved["optimizer"], dict) else None
    if not (isinstance(groups, list) and isinstance(saved["optimizer"].get("state"), dict)
            and len(groups) == len(optimizer.param_groups)
            and all(isinstance(g, dict) and len(g.get("params", ())) == len(mine["params"])
                    for g, mine in zip(groups, optimizer.param_groups))):
        return "its optimizer state does not fit the model"
    if not isinstance(saved["schedule"], dict):
        return "its schedule is damaged"
    generator = torch.Generator().get_state()
    if not (isinstance(stream, dict) and torch.is_tensor(stream.get("generator"))
            and stream["generator"].shape == generator.shape and torch.is_tensor(stream.get("order"))
            and isinstance(stream.get("cursor"), int) and isinstance(stream.get("epoch"), int)):
        return "its data position is damaged"
    if not (torch.is_tensor(saved["rng"]) and saved["rng"].shape == torch.get_rng_state().shape):
        return "its random state is damaged"
    return None


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
    tensorboard=None,
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
    adapter that reports nothing runs exactly `steps` steps, whatever the budget. `tensorboard`: a
    torch.utils.tensorboard SummaryWriter (or None).

    In a process group (harness.core.distributed) every rank draws the whole batch and trains on
    its share through DDP; the curve, the bytes and the FLOPs are those of the whole batch, and
    rank 0 alone saves the training state."""
    model.train()
    training_loss = training_forward(model, device, settings)
    ranks = distributed.world_size()
    saving = resume_path is not None and distributed.is_main()  # other ranks resume from rank 0's state
    optimizer = make_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, settings.warmup_fraction, settings.min_lr_ratio)
    )
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # clipped: only what is trained
    state = {"step": 0, "curve": [], "window_sum": 0.0, "window_count": 0, "auxiliary_sums": {}, "bytes_seen": 0,
             "seconds": 0.0, "flops": None, "window_units": 0}
    resumed_at = None
    saved = None if resume_path is None else saved_state(resume_path, resume_key, steps, model, optimizer, device,
                                                         description)
    if saved is not None:
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
    interactive = show_progress and sys.stderr.isatty()
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=description, unit="step",
               disable=not interactive, leave=False, dynamic_ncols=True)
    plain = PlainProgress(description, steps, state["step"]) if show_progress and not interactive else None
    last_point = (time.perf_counter(), state["bytes_seen"])  # for the throughput TensorBoard gets
    stopped_by_budget = False
    for step in bar:
        batch = stream.next_batch()  # the global batch: its bytes are what the budget counts
        with autocast(device):
            out = training_loss(to_device(distributed.shard(batch) if ranks > 1 else batch, device))
        nll, loss = objective(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
        optimizer.step()
        schedule.step()
        value, loss_value = nll.item(), loss.item()
        auxiliary = {name: float(term.detach()) for name, term in out.auxiliary.items()}
        forward_flops, units = out.forward_flops, out.units or 0
        if ranks > 1:  # the whole batch's figures: means over the ranks' equal shares, FLOPs and units summed
            names = sorted(auxiliary)
            sums = distributed.total([value, loss_value, *(auxiliary[n] for n in names),
                                      float(forward_flops or 0.0), float(units)], device)
            value, loss_value = sums[0] / ranks, sums[1] / ranks
            auxiliary = {n: v / ranks for n, v in zip(names, sums[2:2 + len(names)])}
            forward_flops = sums[-2] if forward_flops is not None else None
            units = int(sums[-1])
        if not math.isfinite(loss_value):
            raise Diverged(step + 1, state.get("last_loss"), loss_value)
        state["last_loss"] = loss_value
        state["step"] = step + 1
        state["bytes_seen"] += batch.numel()
        state["window_sum"] += value
        state["window_count"] += 1
        for name, term in auxiliary.items():
            state["auxiliary_sums"][name] = state["auxiliary_sums"].get(name, 0.0) + term
        if forward_flops is not None:  # the cost moves: charge what this step ran
            step_flops = TRAIN_MULTIPLIER * float(forward_flops)
            state["flops"] = (state["flops"] or 0.0) + step_flops
            stopped_by_budget = budget_flops is not None and budget_flops - state["flops"] < step_flops
        state["window_units"] += units
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
            if plain is not None:
                plain.bpb = bpb
            if tensorboard is not None:
                now = time.perf_counter()
                tensorboard.add_scalar("train/bpb", bpb, step + 1)
                for name, value in point.get("auxiliary", {}).items():
                    tensorboard.add_scalar(f"train/{name}", value, step + 1)
                tensorboard.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step + 1)
                tensorboard.add_scalar("train/bytes_per_s", (state["bytes_seen"] - last_point[1]) / max(now - last_point[0], 1e-9),
                                       step + 1)
                last_point = (now, state["bytes_seen"])
            state["window_sum"], state["window_count"], state["auxiliary_sums"], state["window_units"] = 0.0, 0, {}, 0
        if plain is not None:
            plain.update(step + 1, state["bytes_seen"])
        if stopped_by_budget:
            break
        if saving and time.perf_counter() - last_save >= save_every_s and step + 1 < steps:
            state["seconds"] = time.perf_counter() - start
            save()
            last_save = time.perf_counter()
    synchronize(device)
    if tensorboard is not None:
        tensorboard.flush()
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


class PlainProgress:
    """Progress for logs: one plain line every `every_s` seconds (and at the last step), e.g.
    `RUN: step 120/400 (30%), train 2.913 bpb, 0.49 MB, 4.1 steps/s`."""

    def __init__(self, description: str, steps: int, start_step: int = 0, every_s: float | None = None):
        self.description, self.steps, self.start_step = description, steps, start_step
        self.every_s = PLAIN_PROGRESS_EVERY_S if every_s is None else every_s
        self.started = self.last = time.perf_counter()
        self.bpb: float | None = None

    def update(self, step: int, bytes_seen: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and step < self.steps:
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.started, 1e-9)
        bpb = f", train {self.bpb:.3f} bpb" if self.bpb is not None else ""
        print(f"{self.description}: step {step}/{self.steps} ({step / self.steps:.0%}){bpb}, "
              f"{bytes_seen / 1e6:.2f} MB, {rate:.3g} steps/s", file=sys.stderr, flush=True)
