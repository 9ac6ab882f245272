"""Run records: one JSON file per run, typed (RunRecord), written atomically (temp file +
rename) so a record on disk is always whole, and read with their format version: older
formats are migrated on reading, so committed studies stay readable (docs/protocols.md,
"Records")."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness import RECORD_FORMAT_VERSION, __version__
from harness.errors import HarnessError


class Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Typed):
    name: str
    adapter: str
    config: dict
    trainer: dict = Field(default_factory=dict, description="the suite entry's trainer overrides, unset ones null")


class CorpusFacts(Typed):
    label: str
    id: str
    sha256: str
    train_bytes: int
    val_bytes: int
    test_bytes: int


class Evaluation(Typed):
    bpb: float
    bytes: int
    windows: int
    window_nll_nats: list[float]
    label: str | None = None  # for another evaluation rule: what it is


class FlopsPerByte(Typed):
    analytic: dict[str, float]  # the adapter's breakdown at the training-split rates; "total" is what budgets use
    measured: float | None = None  # format 2 only: the training forward counted on 2 test windows
    counted_training: float | None = None  # the training forward counted on training windows (the check of "total")
    counted_training_windows: int | None = None
    test: float | None = None  # the evaluation rule's forward counted on every scored test window: the inference cost

    def training_deviation(self) -> float | None:
        """Counted training forward / analytic - 1 (the budget's FLOP check)."""
        if self.counted_training is None:
            return None
        return self.counted_training / self.analytic["total"] - 1.0

    def test_deviation(self) -> float | None:
        """Measured test cost / analytic - 1 (data-dependent units are rarer or commoner on test)."""
        return None if self.test is None else self.test / self.analytic["total"] - 1.0


class PreparationFacts(Typed):
    seconds: float = 0.0
    auxiliary_flops: float = 0.0
    unit_length_counts: list[int] | None = None  # units of 1, 2, ... bytes on the training split
    facts: dict = Field(default_factory=dict)


class CurvePoint(Typed):
    step: int
    bytes: int
    train_bpb: float
    auxiliary: dict[str, float] | None = None  # training-only losses, averaged like train_bpb


class SegmentationExample(Typed):
    example_bytes: list[int]
    example_starts: list[int]
    example_scores: list[float] | None
    chunk_length_counts: list[int]
    window: int


class RunRecord(Typed):
    format_version: int = RECORD_FORMAT_VERSION
    suite: str
    run_id: str
    config_hash: str
    model: ModelSpec
    trainer: dict
    trainer_overrides: dict
    budget_flops: float
    seed: int
    corpus: CorpusFacts
    eval: dict
    parameters: dict[str, int]
    flops_per_byte: FlopsPerByte
    sizing: dict | None = None
    units_per_byte: float
    bytes_per_unit: float
    preparation: PreparationFacts
    steps: int
    batch_bytes: int
    bytes_seen: int
    epochs: float
    training_flops: float
    auxiliary_training_flops: float
    count_auxiliary_flops: bool
    total_flops: float
    training_flops_per_byte: float
    calibration: dict
    loss_curve: list[CurvePoint]
    val: Evaluation
    test: Evaluation
    test_variants: dict[str, Evaluation]
    tokenizer: dict
    segmentation: SegmentationExample | None = None
    train_seconds: float
    resumed_at_step: int | None = None
    wall_seconds: float
    achieved_flops_per_s: float
    matmul_peak_flops_per_s: float
    mfu: float
    device: str
    warnings: list[str]
    versions: dict[str, str]
    tuning: dict | None = None  # the tuning trials that chose the trainer settings (harness.core.tuning)


def _from_format_2(raw: dict) -> dict:
    """Format 2 kept the adapter's preparation facts flat, with the auxiliary training FLOPs
    under "flops" and the patchers' histogram under "patch_size_counts"."""
    facts = dict(raw.get("preparation") or {})
    raw["preparation"] = {"seconds": facts.pop("seconds", 0.0), "auxiliary_flops": facts.pop("flops", 0.0),
                          "unit_length_counts": facts.pop("patch_size_counts", None), "facts": facts}
    raw["format_version"] = 3
    return raw


MIGRATIONS = {2: _from_format_2}  # format n -> n + 1


def parse_record(raw: dict, source: Path | str) -> RunRecord:
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int) or not (min(MIGRATIONS) <= version <= RECORD_FORMAT_VERSION):
        raise HarnessError(f"{source}: record format {version}, this harness reads {min(MIGRATIONS)} to {RECORD_FORMAT_VERSION}")
    while version < RECORD_FORMAT_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
    try:
        return RunRecord(**raw)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise HarnessError(f"{source}: {key}: {first['msg']}") from None


def read_record(path: Path) -> RunRecord:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such record") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HarnessError(f"{path}: not a valid JSON record") from None
    return parse_record(raw, path)


def write_record(path: Path, record: RunRecord) -> None:
    write_json_atomic(path, record.model_dump(mode="json"))


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint_atomic(path: Path, state: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "harness": __version__}


def read_suite_records(results_dir: Path) -> list[RunRecord]:
    """Every finished run record under results_dir/runs, sorted by run id."""
    paths = sorted((results_dir / "runs").glob("*/record.json"))
    return [read_record(p) for p in paths]
