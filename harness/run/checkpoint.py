"""Model weights and resumable training states on disk: written atomically, read without
executing pickled code, and rebuilt into a trained adapter from a run folder."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import torch

from harness.api import Adapter, build
from harness.errors import HarnessError
from harness.run.records import read_record


def save_checkpoint_atomic(path: Path, state: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except RuntimeError as e:  # torch's own file writer: a full disk or a folder it cannot write
        temporary.unlink(missing_ok=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "write failed"
        raise OSError(errno.EIO, f"torch.save failed ({reason[:120]}); is the disk full or the folder read-only?",
                      str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_state(path: Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's tensors and plain values, loaded without executing pickled code."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler (struct.error, IndexError, KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if reason.startswith("Weights only load failed"):
            reason = "it holds pickled objects besides tensors and plain values; they are not loaded, as that could run code"
        raise HarnessError(f"{path}: not a loadable checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict):
        raise HarnessError(f"{path}: not a loadable checkpoint (it holds a {type(state).__name__}, not a mapping of tensors)")
    return state


def load_checkpoint(run_dir: Path, device: str | torch.device = "cpu") -> Adapter:
    """Rebuild a trained adapter from a run directory (record.json + model.pt)."""
    record = read_record(run_dir / "record.json")
    model = build(record.model.adapter, record.model.config)
    checkpoint = run_dir / "model.pt"
    if not checkpoint.exists():
        raise HarnessError(f"{run_dir}: no model.pt checkpoint (was the run finished?)")
    try:
        model.load_state_dict(load_state(checkpoint, device))
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a tokenizer state that is not one
        raise HarnessError(f"{checkpoint}: does not fit adapter {record.model.adapter!r} "
                           f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
