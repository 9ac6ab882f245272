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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from harness.api import Adapter
from harness.errors import HarnessError
from harness.modeling.flops import TRAIN_MULTIPLIER
from harness.modeling.runtime import autocast, synchronize, to_device
from harness.run import distributed
from harness.run.checkpoint import load_state, save_checkpoint_atomic
from harness.run.data import TrainStream
from harness.run.spec import TrainerSettings
from harness.storage import note_unhashed, remove_hashed


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
    None. A file that is not the one saved (its sha256 differs from partial.pt.sha256), cannot be
    loaded, or does not fit the model and optimizer, is deleted with a warning and the run starts over; a state of another config is left to be overwritten."""
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
            note_unhashed(path)
            return saved
        problem = f"{path}: {problem}"
    tqdm.write(f"warning: {description}: {problem}; deleted it, the run starts over")
    remove_hashed(path)
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


@dataclass(frozen=True)
class TrainingResult:
    """What train() did: the loss curve, the steps and bytes it trained, the training FLOPs spent
    when the adapter reports what each step ran (else None: the plan's fixed rate holds), and
    whether the budget stopped it before the schedule's last step."""

    curve: list[dict]
    steps: int
    flops: float | None
    stopped_by_budget: bool
    seconds: float
    bytes_seen: int
    epochs: float
    resumed_at_step: int | None


@dataclass
class Optimization:
    """AdamW, its warmup-cosine schedule over `steps`, and the parameters it clips."""

    optimizer: torch.optim.AdamW
    schedule: torch.optim.lr_scheduler.LambdaLR
    trained: list[torch.Tensor]


def make_optimization(model: torch.nn.Module, settings: TrainerSettings, steps: int) -> Optimization:
    optimizer = make_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, settings.warmup_fraction, settings.min_lr_ratio))
    return Optimization(optimizer, schedule, [p for group in optimizer.param_groups for p in group["params"]])


def training_step(forward, batch: torch.Tensor, opt: Optimization, grad_clip: float, device: torch.device,
                  mark=lambda: None):
    """One optimizer step on a batch already on `device`: forward, objective, backward, clip,
    AdamW and schedule. The trainer, `harness bench` (which times the phases through `mark`,
    called after the forward, the backward and the update) and auxiliary models all step here.
    Returns (the adapter's TrainingLoss, the mean NLL, the loss trained on)."""
    with autocast(device):
        out = forward(batch)
    nll, loss = objective(out)
    mark()
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(opt.trained, grad_clip)
    opt.optimizer.step()
    opt.schedule.step()
    mark()
    return out, nll, loss


def train(model: Adapter, stream: TrainStream, settings: TrainerSettings, steps: int, device: torch.device,
          description: str = "train", show_progress: bool = True, resume_path: Path | None = None,
          resume_key: str = "", save_every_s: float = 60.0, budget_flops: float | None = None,
          tensorboard=None) -> TrainingResult:
    """Train for `steps` optimizer steps. The objective is the mean NLL per byte plus the
    adapter's auxiliary training losses (Adapter.training_loss). With `resume_path`, a saved
    state whose `resume_key` matches is continued.

    An adapter whose cost moves during training (H-Net's learned chunk rate) reports the forward
    FLOPs each batch ran (TrainingLoss.forward_flops): each step is then charged
    TRAIN_MULTIPLIER x those, the curve records the FLOPs spent (and bytes per unit, when the
    adapter reports its units), and with `budget_flops` training stops after the step that
    leaves less budget than that step cost (like the floor() of a fixed-rate plan, it does not
    start a step the rest would not pay for at the last step's cost). `steps` stays the
    schedule's length: if the steps run out first, the rest of the budget is left unspent. An
    adapter that reports nothing runs exactly `steps` steps, whatever the budget. `tensorboard`: a
    torch.utils.tensorboard SummaryWriter (or None).

    In a process group (harness/run/distributed.py) every rank draws the whole batch and trains on
    its share through DDP; the curve, the bytes and the FLOPs are those of the whole batch, and
    rank 0 alone saves the training state."""
    model.train()
    forward = training_forward(model, device, settings)
    ranks = distributed.world_size()
    opt = make_optimization(model, settings, steps)
    state, resumed_at = _start_state(model, opt, stream, steps, device, description, resume_path, resume_key)
    saving = resume_path is not None and distributed.is_main()  # other ranks resume from rank 0's state
    start, last_save = time.perf_counter() - state["seconds"], time.perf_counter()
    progress = _Progress(description, steps, state, show_progress, tensorboard)
    stopped_by_budget = False
    for step in progress.steps:
        batch = stream.next_batch()  # the global batch: its bytes are what the budget counts
        out, nll, loss = training_step(forward, to_device(distributed.shard(batch) if ranks > 1 else batch, device),
                                       opt, settings.grad_clip, device)
        figures = _whole_batch(nll.item(), loss.item(), out, ranks, device)
        if not math.isfinite(figures["loss"]):
            raise Diverged(step + 1, state.get("last_loss"), figures["loss"])
        stopped_by_budget = _tally(state, step + 1, figures, batch.numel(), budget_flops)
        if (step + 1) % settings.log_every == 0 or step + 1 == steps or stopped_by_budget:
            progress.point(_curve_point(state, batch.numel()), opt.optimizer.param_groups[0]["lr"])
        progress.update(state)
        if stopped_by_budget:
            break
        if saving and time.perf_counter() - last_save >= save_every_s and step + 1 < steps:
            state["seconds"] = time.perf_counter() - start
            _save(resume_path, resume_key, model, opt, stream, state)
            last_save = time.perf_counter()
    synchronize(device)
    progress.close()
    return TrainingResult(curve=state["curve"], steps=state["step"], flops=state["flops"],
                          stopped_by_budget=stopped_by_budget, seconds=time.perf_counter() - start,
                          bytes_seen=state["bytes_seen"], resumed_at_step=resumed_at,
                          epochs=state["bytes_seen"] / (stream.windows_per_epoch * stream.data.shape[1]))


def _start_state(model: Adapter, opt: Optimization, stream: TrainStream, steps: int, device: torch.device,
                 description: str, resume_path: Path | None, resume_key: str) -> tuple[dict, int | None]:
    """The training progress to start from: a saved state that continues this run (loaded into
    the model, optimizer, schedule, stream and RNG), else a fresh one; and the step resumed at."""
    state = {"step": 0, "curve": [], "window_sum": 0.0, "window_count": 0, "auxiliary_sums": {}, "bytes_seen": 0,
             "seconds": 0.0, "flops": None, "window_units": 0}
    saved = None if resume_path is None else saved_state(resume_path, resume_key, steps, model, opt.optimizer,
                                                         device, description)
    if saved is None:
        return state, None
    model.load_state_dict(saved["model"])
    opt.optimizer.load_state_dict(saved["optimizer"])
    opt.schedule.load_state_dict(saved["schedule"])
    stream.load_state_dict(saved["stream"])
    torch.set_rng_state(saved["rng"])
    state = {"flops": None, "window_units": 0, "auxiliary_sums": {}} | saved["state"]
    tqdm.write(f"{description}: resuming at step {state['step']} of {steps}")
    return state, state["step"]


def _save(path: Path, key: str, model: Adapter, opt: Optimization, stream: TrainStream, state: dict) -> None:
    save_checkpoint_atomic(path, {
        "key": key, "model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
        "schedule": opt.schedule.state_dict(), "stream": stream.state_dict(), "rng": torch.get_rng_state(),
        "state": state,
    })


def _whole_batch(nll: float, loss: float, out, ranks: int, device: torch.device) -> dict:
    """A step's figures for the whole batch: across processes, means over the ranks' equal shares,
    FLOPs and units summed."""
    auxiliary = {name: float(term.detach()) for name, term in out.auxiliary.items()}
    forward_flops, units = out.forward_flops, out.units or 0
    if ranks > 1:
        names = sorted(auxiliary)
        sums = distributed.total([nll, loss, *(auxiliary[n] for n in names), float(forward_flops or 0.0), float(units)],
                                 device)
        nll, loss = sums[0] / ranks, sums[1] / ranks
        auxiliary = {n: v / ranks for n, v in zip(names, sums[2:2 + len(names)])}
        forward_flops = sums[-2] if forward_flops is not None else None
        units = int(sums[-1])
    return {"nll": nll, "loss": loss, "auxiliary": auxiliary, "forward_flops": forward_flops, "units": units}


def _tally(state: dict, step: int, figures: dict, batch_bytes: int, budget_flops: float | None) -> bool:
    """Add a finished step to the progress; True if the budget cannot pay for another such step."""
    state["last_loss"] = figures["loss"]
    state["step"] = step
    state["bytes_seen"] += batch_bytes
    state["window_sum"] += figures["nll"]
    state["window_count"] += 1
    for name, term in figures["auxiliary"].items():
        state["auxiliary_sums"][name] = state["auxiliary_sums"].get(name, 0.0) + term
    state["window_units"] += figures["units"]
    if figures["forward_flops"] is None:
        return False
    step_flops = TRAIN_MULTIPLIER * float(figures["forward_flops"])  # the cost moves: charge what this step ran
    state["flops"] = (state["flops"] or 0.0) + step_flops
    return budget_flops is not None and budget_flops - state["flops"] < step_flops


def _curve_point(state: dict, batch_bytes: int) -> dict:
    """The loss curve's point for the steps since the last one (appended to the curve), and a
    fresh window for the next."""
    count = state["window_count"]
    point = {"step": state["step"], "bytes": state["bytes_seen"],
             "train_bpb": round(state["window_sum"] / count / math.log(2), 5)}
    if state["auxiliary_sums"]:
        point["auxiliary"] = {name: round(total / count, 6) for name, total in state["auxiliary_sums"].items()}
    if state["flops"] is not None:
        point["flops"] = state["flops"]
    if state["window_units"]:
        point["bytes_per_unit"] = round(count * batch_bytes / state["window_units"], 5)
    state["curve"].append(point)
    state["window_sum"], state["window_count"], state["auxiliary_sums"], state["window_units"] = 0.0, 0, {}, 0
    return point


class _Progress:
    """Where training progress goes: a tqdm bar on a terminal, plain lines otherwise, and
    TensorBoard when a writer is given."""

    def __init__(self, description: str, steps: int, state: dict, show: bool, tensorboard):
        interactive = show and sys.stderr.isatty()
        self.bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=description,
                        unit="step", disable=not interactive, leave=False, dynamic_ncols=True)
        self.steps = self.bar
        self.plain = PlainProgress(description, steps, state["step"]) if show and not interactive else None
        self.tensorboard = tensorboard
        self.last = (time.perf_counter(), state["bytes_seen"])  # for the throughput TensorBoard gets

    def point(self, point: dict, lr: float) -> None:
        self.bar.set_postfix(bpb=f"{point['train_bpb']:.3f}", MB=f"{point['bytes'] / 1e6:.2f}")
        if self.plain is not None:
            self.plain.bpb = point["train_bpb"]
        if self.tensorboard is None:
            return
        step, now = point["step"], time.perf_counter()
        self.tensorboard.add_scalar("train/bpb", point["train_bpb"], step)
        for name, value in point.get("auxiliary", {}).items():
            self.tensorboard.add_scalar(f"train/{name}", value, step)
        self.tensorboard.add_scalar("train/lr", lr, step)
        self.tensorboard.add_scalar("train/bytes_per_s", (point["bytes"] - self.last[1]) / max(now - self.last[0], 1e-9),
                                    step)
        self.last = (now, point["bytes"])

    def update(self, state: dict) -> None:
        if self.plain is not None:
            self.plain.update(state["step"], state["bytes_seen"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()


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
