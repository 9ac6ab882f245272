"""The adapter interface (docs/protocols.md, "Adapters").

An adapter is one file: a torch module with a name, a one-line description, a
pydantic config, an optional preparation on the training split, an analytic
forward FLOPs-per-byte count, and a forward pass that maps byte windows (B, W)
to the negative log-likelihood in nats of every byte (B, W). The trainer and the
evaluator see adapters only through this class; every hook has a default, so an
adapter overrides only what it has.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from harness.errors import HarnessError
from harness.modeling.windows import BOS, BYTE_VOCAB  # noqa: F401  (the adapters' symbols)



@dataclass(frozen=True)
class AuxiliaryTraining:
    """What the harness's trainer reports after training an auxiliary model for an adapter."""

    steps: int
    bytes_seen: int
    epochs: float
    seconds: float
    final_train_bpb: float


class AuxiliaryTrainer(Protocol):
    """The harness's one trainer and evaluator, lent to an adapter's prepare() for a model of its
    own (BLT's entropy model): the same training step, schedule and windows as a run's."""

    def train(self, model: "Adapter", data: bytes, *, batch_windows: int, lr: float, steps: int,
              description: str) -> AuxiliaryTraining: ...

    def bits_per_byte(self, model: "Adapter", data: bytes) -> tuple[float, int]:
        """Bits per byte over the windows of `data`, and how many bytes were scored."""


@dataclass(frozen=True)
class RunContext:
    """What an adapter may know about the run it is part of. Given to prepare() and
    finish_training(); adapters never ask for these again in their own config."""

    window: int  # bytes per training and evaluation window (the suite's eval.window)
    seed: int
    device: torch.device = torch.device("cpu")
    budget_flops: float = 0.0  # the run's training budget; auxiliary training is charged to it
    count_auxiliary_flops: bool = True  # whether auxiliary models count (the BLT paper leaves them out)
    max_epochs: float | None = None  # the suite's cap on passes over the training split; auxiliary models keep it too
    trainer: AuxiliaryTrainer | None = None  # for auxiliary models; set by the harness for every run


@dataclass
class Preparation:
    """What prepare() learned, for the record. `auxiliary_flops` (training an auxiliary model,
    e.g. BLT's entropy model) is charged to the budget when the suite counts auxiliary FLOPs;
    `unit_length_counts[i]` counts units (tokens, patches) of i + 1 bytes on the training split."""

    seconds: float = 0.0
    auxiliary_flops: float = 0.0
    unit_length_counts: list[int] | None = None
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationCost:
    """What finish_training() will spend, stated before training so the budget can reserve it:
    forward FLOPs in all (the harness.modeling.flops convention), and the part of them that
    FlopCounterMode cannot see (e.g. a Cholesky factorisation), which the count after the pass adds."""

    flops: float = 0.0
    uncounted: float = 0.0


@dataclass
class TrainingLoss:
    """One training forward: the per-byte NLL (B, W) that is the objective, plus scalar
    auxiliary losses (e.g. H-Net's ratio loss) that the trainer adds to it and records in the
    loss curve; the evaluator never sees them. `forward_flops`: FLOPs this batch actually ran,
    for adapters whose cost moves during training (None: the analytic figure holds); the trainer
    charges 3 x those to the budget. `units`: the units (chunks) this batch ran, for the loss
    curve's bytes per unit."""

    nll: torch.Tensor
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)
    forward_flops: float | None = None
    units: int | None = None


@dataclass(frozen=True)
class SizingFields:
    """The config fields that matched-inference-cost sizing may change (harness.run.sizing):
    the main model's width and depth, the heads that the width must split into, and the model's
    other widths, each with the heads field it must split into (None: any whole width). Sizing
    grows every width by one factor, keeping their configured ratios, and the main depth.
    Widths that belong to an auxiliary model (BLT's entropy model) are not listed: they stay."""

    width: str
    depth: str
    heads: str
    other_widths: dict[str, str | None] = field(default_factory=dict)

    def widths(self) -> dict[str, str | None]:
        """Every width field, the main one first, and the heads field each splits into."""
        return {self.width: self.heads, **self.other_widths}


class AdapterConfig(BaseModel):
    """Base for adapter configs: unknown keys are errors, fields are typed. `renamed` maps a key an
    older version took to its new name, so that the error for the old key names the new one."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _say_what_a_key_became(cls, values):
        if isinstance(values, dict):
            for old, new in cls.renamed.items():
                if old in values and new not in values:
                    raise ValueError(f"{old!r} is now {new!r}")
        return values


# Upper bounds of config fields (Field(le=...)), checked when a suite is read, before any model is
# built: an extra zero is refused in one line naming the field, not after minutes of allocation.
MAX_WIDTH = 1 << 15  # d_model, d_global, ...: above the widest models trained (about 25k)
MAX_VOCAB = 1 << 20  # tokenizer vocabularies: the largest in use hold about 256k


class Adapter(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]
    sizing: ClassVar[SizingFields | None] = None  # None: cannot be sized to an inference cost
    byte_level: ClassVar[bool] = True  # predicts one byte at a time (next_byte_logits); False: scores tokens
    # prepare() keeps its result in a cache that every run of the model shares (a trained tokenizer):
    # a suite sent out as jobs prepares it once before dispatch
    cached_preparation: ClassVar[bool] = False

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    # ---- preparation and calibration -------------------------------------------------
    def prepare(self, train: bytes, ctx: RunContext) -> Preparation:
        """Fit whatever the model needs from the training split before training (a tokenizer,
        an entropy model, a rate). Whatever is learned must live in the module's state
        (buffers, submodules or plain-typed extra state) so a checkpoint restores it; extra state
        (get_extra_state) is saved as JSON beside the tensors, so it holds JSON types only."""
        return Preparation()

    def carry_preparation(self, prepared: "Adapter") -> None:
        """Take over what `prepared` (same adapter, other width or depth) learned in prepare(),
        so a resized model need not prepare again (harness.run.sizing)."""

    def finish_training(self, train: bytes, ctx: RunContext) -> dict:
        """After training, before evaluation: e.g. calibrate a threshold of the trained model on
        the training split. Returns facts for the record. Its passes are charged to the budget:
        state them in calibration_cost, and run nothing else (a timing belongs in `harness bench`)."""
        return {}

    def calibration_cost(self, train_bytes: int, window: int) -> CalibrationCost:
        """What finish_training() will spend on a training split of `train_bytes` with windows of
        `window` bytes, from the config alone (before training; the budget reserves it). The
        harness counts the pass when it runs and warns when the count differs."""
        return CalibrationCost()

    # ---- the model ---------------------------------------------------------------------
    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """windows: (B, W) int64 bytes. Returns (B, W, 256) logits of byte t given bytes < t.
        Byte-level adapters implement only this."""
        raise TypeError(f"adapter {self.name!r} is not byte-level: it has no next-byte logits")

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows: (B, W) int64 bytes in 0..255. Returns (B, W) NLL in nats per byte, where
        each byte's prediction depends only on earlier bytes of its window. Models that
        predict several bytes at once (tokens) override this and put the unit's NLL on its
        last byte and 0 on the others."""
        logits = self.next_byte_logits(windows)
        return F.cross_entropy(logits.float().transpose(1, 2), windows, reduction="none")

    def training_loss(self, windows: torch.Tensor) -> TrainingLoss:
        """The trainer's forward. Override to add auxiliary losses or to report the FLOPs a
        batch actually ran; the default is the plain NLL."""
        return TrainingLoss(nll=self(windows))

    # ---- hooks with defaults -------------------------------------------------------------
    def segment(self, windows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """How the model cuts (B, W) windows into units under its evaluation rule: (scores (B, W)
        computed from bytes < t, or None for rules without a score; starts (B, W) bool, byte t
        begins a unit). None for models without byte-aligned units (`harness segment`, the
        report's pictures)."""
        return None

    def auxiliary_part(self, windows: torch.Tensor) -> tuple[str, Callable[[], None]] | None:
        """A part of the forward with its own cost, to be timed on its own by `harness bench`
        (e.g. ByteFlow's chunk scoring, an entropy model): (label, a call that runs it on
        `windows`); None for adapters without one."""
        return None

    def eval_variants(self) -> dict[str, str]:
        """Other evaluation rules the evaluator should also report, name -> label (e.g.
        ByteFlow's non-causal top-K). Selected with set_eval_variant."""
        return {}

    def set_eval_variant(self, name: str | None) -> None:
        if name is not None:
            raise HarnessError(f"adapter {self.name!r} has no evaluation variant {name!r}")

    def export(self, out_dir: Path, record: dict) -> str:
        """Write the trained model in another library's format; returns a one-line description."""
        raise HarnessError(f"adapter {self.name!r} cannot be exported (token models with a Llama body can)")

    def tokenizer_metrics(self, test: bytes, window: int) -> dict:
        """Figures for the report's tokenizer table on the test split; empty without a tokenizer."""
        return {}

    def audit_stable_prefix(self, original: bytes, perturbed: bytes) -> int:
        """How many leading bytes' NLLs must be unchanged when `original` becomes `perturbed`
        (docs/protocols.md, "Causality"). Byte-level: every byte before the first change."""
        return next((i for i, (a, b) in enumerate(zip(original, perturbed)) if a != b), len(original))

    # ---- accounting ----------------------------------------------------------------------
    def units_per_byte(self) -> float:
        """Model positions per byte (tokens, patches or chunks per byte); 1 for byte models."""
        return 1.0

    @abstractmethod
    def flops_per_byte(self, window: int) -> dict[str, float]:
        """Analytic forward FLOPs per byte for windows of `window` bytes, as a breakdown whose
        "total" entry is what budgets use. An "auxiliary" entry (e.g. an entropy model's
        inference) is part of "total" and is dropped from it when the suite does not count
        auxiliary FLOPs. Must follow harness.modeling.flops conventions."""

    def uncounted_flops_per_byte(self, window: int) -> float:
        """Part of flops_per_byte that FlopCounterMode cannot see (e.g. a Cholesky factorisation)."""
        return 0.0

    def parameter_counts(self) -> dict[str, int]:
        embedding = sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
