"""The adapter interface and the one registry of adapters (DESIGN.md section 6).

An adapter is one file: a torch module with a name, a one-line description, a
pydantic config, an optional preparation on the training split, an analytic
forward FLOPs-per-byte count, and a forward pass that maps byte windows
(B, W) to the negative log-likelihood in nats of every byte (B, W). The trainer
and evaluator see adapters only through this interface.

Built-in adapters live in `baselines/` and `byteflow/` and register with
@register when their module is imported; third-party packages add theirs
through the `harness.adapters` entry-point group.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from abc import ABCMeta, abstractmethod
import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from harness.errors import HarnessError

ENTRY_POINT_GROUP = "harness.adapters"
BUILTIN_PACKAGES = ("baselines", "byteflow")
BYTE_VOCAB = 256
BOS = 256  # the one special byte-level symbol: beginning of a window


@dataclass(frozen=True)
class SizingFields:
    """The config fields that matched-inference-cost sizing may change (harness.sizing):
    the main model's width and depth, and the heads that the width must split into."""

    width: str
    depth: str
    heads: str


class AdapterConfig(BaseModel):
    """Base for adapter configs: unknown keys are errors, fields are typed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Adapter(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]
    sizing: ClassVar[SizingFields | None] = None  # None: cannot be sized to an inference cost

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    def prepare(self, train: bytes, seed: int) -> dict:
        """Fit whatever the model needs from the training split before training
        (a tokenizer, an entropy model, a threshold). Returns facts for the record,
        e.g. {"seconds": ..., "flops": ...}; "flops" (training FLOPs of an auxiliary
        model) is charged to the run's budget unless the suite sets
        count_auxiliary_flops: false. Whatever is learned must be kept in
        the module's state (buffers, submodules or extra state) so a checkpoint
        restores it."""
        return {}

    def carry_preparation(self, prepared: "Adapter") -> None:
        """Take over what `prepared` (same adapter, other width or depth) learned in
        prepare(), so a resized model need not prepare again (harness.sizing)."""

    def finish_training(self, train: bytes) -> dict:
        """Called after training and before evaluation, e.g. to calibrate a threshold of
        the trained model on the training split. Returns facts for the record."""
        return {}

    def tokenizer_metrics(self, test: bytes, window: int) -> dict:
        """Figures for the report's tokenizer table on the test split (tokenizer, vocab_size,
        bytes_per_token_test, bytes_per_token_test_windows, vocab_used_test,
        tokenizer_train_seconds, encode_mb_per_s); empty for models without a tokenizer."""
        return {}

    def units_per_byte(self) -> float:
        """Model positions per byte (tokens or patches per byte); 1 for byte models."""
        return 1.0

    @abstractmethod
    def flops_per_byte(self, window: int) -> dict[str, float]:
        """Analytic forward FLOPs per byte for windows of `window` bytes, as a breakdown
        whose "total" entry is what budgets use. An "auxiliary" entry (e.g. an entropy
        model's inference) is part of "total" and is dropped from it when the suite sets
        count_auxiliary_flops: false. Must match harness.flops conventions."""

    def uncounted_flops_per_byte(self, window: int) -> float:
        """Part of flops_per_byte that FlopCounterMode cannot see (e.g. a Cholesky factorisation)."""
        return 0.0

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor | None:
        """windows: (B, W) int64 bytes. Returns (B, W, 256) logits of byte t given bytes < t
        for models that predict one byte at a time, or None for models that score
        multi-byte units (tokens). Byte-level adapters implement only this."""
        return None

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows: (B, W) int64 bytes in 0..255. Returns (B, W) NLL in nats per byte,
        where each byte's prediction depends only on earlier bytes of its window.
        Models that predict several bytes at once (tokens) override this and put the
        unit's NLL on its last byte and 0 on the others."""
        logits = self.next_byte_logits(windows)
        if logits is None:
            raise TypeError(f"adapter {self.name!r} must define next_byte_logits or forward")
        return F.cross_entropy(logits.float().transpose(1, 2), windows, reduction="none")

    def audit_stable_prefix(self, original: bytes, perturbed: bytes) -> int:
        """How many leading bytes' NLLs must be unchanged when `original` becomes
        `perturbed` (DESIGN.md section 3). Byte-level: every byte before the first change."""
        return next((i for i, (a, b) in enumerate(zip(original, perturbed)) if a != b), len(original))

    def parameter_counts(self) -> dict[str, int]:
        embedding = sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def eval_variants(self) -> dict[str, str]:
        """Other evaluation rules the evaluator should also report, name -> label
        (e.g. ByteFlow's non-causal top-K). Selected with set_eval_variant."""
        return {}

    def set_eval_variant(self, name: str | None) -> None:
        if name is not None:
            raise HarnessError(f"adapter {self.name!r} has no evaluation variant {name!r}")


_REGISTRY: dict[str, type[Adapter]] = {}
_discovered = False


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"{cls!r} is not an Adapter subclass")
    for attr in ("name", "description", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"adapter {cls.__name__} lacks the class attribute {attr!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"adapter name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if isinstance(loaded, type) and issubclass(loaded, Adapter) and loaded.name not in _REGISTRY:
            register(loaded)


def available() -> dict[str, type[Adapter]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Adapter]:
    adapters = available()
    if name not in adapters:
        close = difflib.get_close_matches(name, adapters, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise HarnessError(f"unknown adapter {name!r} (known: {', '.join(adapters)}){hint}")
    return adapters[name]


def build(name: str, config: dict) -> Adapter:
    cls = get(name)
    return cls(cls.Config(**config))


def load_checkpoint(run_dir: Path, device: str | torch.device = "cpu") -> Adapter:
    """Rebuild a trained adapter from a run directory (record.json + model.pt)."""
    from harness.core.records import read_record

    record = read_record(run_dir / "record.json")
    model = build(record["model"]["adapter"], record["model"]["config"])
    checkpoint = run_dir / "model.pt"
    if not checkpoint.exists():
        raise HarnessError(f"{run_dir}: no model.pt checkpoint (was the run finished?)")
    model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=False))
    return model.to(device).eval()
