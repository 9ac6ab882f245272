"""Model weights and resumable training states on disk: written atomically with their sha256
beside them (harness.storage), checked against it and read without executing pickled code, and
rebuilt into a trained adapter from a run folder.

A finished run's weights are model.safetensors: the tensors of the adapter's state_dict, and its
other values (an adapter's extra state: a trained tokenizer, a measured rate) as JSON in the file's
metadata under EXTRA_STATE_KEY. Runs from before hold model.pt (torch.save), still read, weights only.
A resumable training state (partial.pt: weights, optimizer, schedule, data stream, RNG) stays a
torch.save file, read weights only."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.api import Adapter, build
from harness.errors import HarnessError
from harness.run.records import read_record
from harness.storage import file_damage, file_mode, note_unhashed, replace_hashed

WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "model.pt"
EXTRA_STATE_KEY = "harness_plain_values"  # metadata entry: the state_dict's non-tensor values as JSON


def _write_atomic(path: Path, write: Callable[[Path], None], writer: str) -> None:
    """write(temporary), then rename it to `path` with its sha256 recorded beside it."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.chmod(temporary, file_mode())  # safetensors writes 0o600; weights are read like any other file
        replace_hashed(temporary, path)
    except (RuntimeError, SafetensorError) as e:  # the library's own file writer: a full disk or a folder it cannot write
        temporary.unlink(missing_ok=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "write failed"
        raise OSError(errno.EIO, f"{writer} failed ({reason[:120]}); is the disk full or the folder read-only?",
                      str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_checkpoint_atomic(path: Path, state: dict) -> None:
    """A training state (any tensors and plain values) as a torch.save file."""
    _write_atomic(path, lambda temporary: torch.save(state, temporary), "torch.save")


def save_weights(path: Path, state_dict: dict) -> None:
    """A model's state_dict as safetensors: tensors as tensors, other values as JSON metadata."""
    tensors = {k: v.detach().cpu().clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    metadata = {EXTRA_STATE_KEY: json.dumps(plain)}  # TypeError here: an adapter's extra state is not plain data
    _write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=metadata), "safetensors")


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict:
    """A state_dict from save_weights' file (tensors and plain values), checked against its hash."""
    _refuse_damaged(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            plain = json.loads((f.metadata() or {}).get(EXTRA_STATE_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:  # ValueError: also bad JSON in the metadata
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarnessError(f"{path}: not a loadable safetensors file ({reason[:160]})") from None
    if not isinstance(plain, dict):
        raise HarnessError(f"{path}: not a loadable safetensors file (its {EXTRA_STATE_KEY} metadata is not a mapping)")
    return state | plain


def _refuse_damaged(path: Path) -> None:
    damage = file_damage(path) if path.is_file() else None
    if damage is not None:
        raise HarnessError(f"{path}: {damage}")


def load_state(path: Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's tensors and plain values, checked against its hash and loaded without
    executing pickled code."""
    _refuse_damaged(path)
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
    """Rebuild a trained adapter from a run directory (record.json + model.safetensors, or the
    model.pt of a run from before)."""
    record = read_record(run_dir / "record.json")
    model = build(record.model.adapter, record.model.config)
    checkpoint = run_dir / WEIGHTS_FILE
    if not checkpoint.exists():
        checkpoint = run_dir / LEGACY_WEIGHTS_FILE
    if not checkpoint.exists():
        raise HarnessError(f"{run_dir}: no {WEIGHTS_FILE} (was the run finished?)")
    state = load_weights(checkpoint, device) if checkpoint.name == WEIGHTS_FILE else load_state(checkpoint, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a tokenizer state that is not one
        raise HarnessError(f"{checkpoint}: does not fit adapter {record.model.adapter!r} "
                           f"({str(e).splitlines()[0][:160]})") from None
    note_unhashed(checkpoint)
    return model.to(device).eval()
