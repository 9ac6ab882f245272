"""One run across processes: DDP through torch.distributed (README, "Scale-out").

A process group is started from the usual environment variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), which torchrun, `harness run --nproc N` (torch's elastic launcher)
and submitit's multi-task jobs set. Every rank builds the same model from the run's seed and
draws the same global batch; each trains on its own contiguous share of the windows, and
DDP averages the gradients, so a step equals the single-process step on the whole batch (the
bytes, the FLOPs and the schedule do not change with the number of processes). Rank 0 alone
writes records, checkpoints and logs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from harness.errors import HarnessError

# Other ranks wait in a collective while rank 0 waits for a run's lock or writes; a hang is
# still ended, but no ordinary wait should be.
TIMEOUT = timedelta(hours=24)


def log(message: str) -> None:
    """A progress line, printed by rank 0 only: one voice for a run trained across processes."""
    if is_main():
        tqdm.write(message)


def rank() -> int:
    """This process's rank; 0 outside a process group (also before it starts: from RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the process group the environment describes (nothing for a single process) and
    return this rank's device: cuda:LOCAL_RANK on CUDA (nccl), the CPU otherwise (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise HarnessError(f"rank {rank()} needs cuda:{local}, but {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_main(value):
    """Rank 0's `value` on every rank (a decision all ranks must share)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch of windows."""
    if batch.shape[0] % world_size():
        raise HarnessError(f"a batch of {batch.shape[0]} windows does not split evenly over {world_size()} processes")
    share = batch.shape[0] // world_size()
    return batch[rank() * share:(rank() + 1) * share]


def total(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks, in float64 (nccl reduces only tensors on the GPU)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class TrainingStep(torch.nn.Module):
    """An adapter's training loss as a forward(), so that DistributedDataParallel sees the call
    (DDP prepares its gradient reduction in forward; adapters train through training_loss)."""

    def __init__(self, adapter: torch.nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, windows: torch.Tensor):
        return self.adapter.training_loss(windows)


def wrap(model: torch.nn.Module, device: torch.device):
    """model.training_loss, through DDP when there are several ranks."""
    if world_size() == 1:
        return model.training_loss
    # every built-in adapter's trained parameters all take part in each step's loss (checked), so DDP
    # need not search the graph for unused ones
    return torch.nn.parallel.DistributedDataParallel(
        TrainingStep(model), device_ids=[device.index] if device.type == "cuda" else None)
