"""Run records: one JSON file per run, typed (RunRecord), written atomically (temp file +
rename) so a record on disk is always whole, and read with their format version: older
formats are migrated on reading, so committed studies stay readable (docs/protocols.md,
"Records")."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness import RECORD_FORMAT_VERSION, __version__
from harness.storage import file_mode, json_object, note_unhashed, write_json_atomic  # noqa: F401  (records are written with it)
from harness.errors import HarnessError
from harness.run.spec import EvalSettings, TrainerSettings


class Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Typed):
    name: str
    adapter: str
    config: dict
    trainer: dict = Field(default_factory=dict, description="the suite entry's trainer overrides, unset ones null")
    factors: dict[str, str] = Field(default_factory=dict, description="the row's level of each suite factor that "
                                                                      "crosses it (older records: none)")


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


class TestSet(Evaluation):
    """Another test set the run's model scores under its evaluation rule: one language of a
    parallel corpus, or a noised copy of the test split. `flops_per_byte` is the forward cost
    counted on exactly these windows, one at a time (useful FLOPs, like FlopsPerByte.test)."""

    kind: Literal["language", "noise", "noise-conditional"]
    flops_per_byte: float
    units_per_byte: float | None = None  # model positions per scored byte (tokens, patches; 1 for bytes)
    text_bytes: int | None = None  # the set's whole text; its windows (`bytes`) leave out the tail
    tokenizer: dict | None = None  # a tokenizer's figures on the whole text (harness/run/parallel.py)


class FlopsPerByte(Typed):
    analytic: dict[str, float]  # the adapter's breakdown at the training-split rates; "total" is what budgets use
    measured: float | None = None  # format 2 only: the training forward counted on 2 test windows
    counted_training: float | None = None  # the training forward counted on training windows (the check of "total")
    counted_training_windows: int | None = None
    test: float | None = None  # the evaluation rule's forward counted on every scored test window: the inference cost
    # the same windows counted in the evaluator's batches (eval.batch_windows), each padded to its batch's longest unit
    # count: what batched evaluation computed; the protocol counts `test` (useful FLOPs)
    test_batched: float | None = None

    def training_deviation(self) -> float | None:
        """Counted training forward / analytic - 1 (the budget's FLOP check)."""
        if self.counted_training is None:
            return None
        return self.counted_training / self.analytic["total"] - 1.0

    def test_deviation(self) -> float | None:
        """Measured test cost / analytic - 1 (data-dependent units are rarer or commoner on test)."""
        return None if self.test is None else self.test / self.analytic["total"] - 1.0

    def padding_share(self) -> float | None:
        """Batched evaluation's FLOPs / the useful ones - 1: what padding windows to a batch added."""
        return None if self.test is None or self.test_batched is None else self.test_batched / self.test - 1.0


class CostCheck(Typed):
    """Matched inference cost where it is scored (harness.run.budget.check_test_cost): the forward
    FLOPs per byte counted on the scored test windows against the target the run was sized to."""

    target: float  # the suite's inference cost at the run's budget (sizing's target_flops_per_byte)
    test: float  # counted on the test windows, as the target counts (auxiliary models left out when the suite does)
    relative_error: float  # test / target - 1
    tolerance: float
    matched: bool  # |relative_error| <= tolerance; otherwise the report ranks and fits the run's row with no other


class CalibrationFlops(Typed):
    """The passes after training (Adapter.finish_training, e.g. H-Net's rate, ByteFlow's threshold)."""

    reserved: float  # stated by the adapter before training (Adapter.calibration_cost) and kept out of training's share
    spent: float  # FlopCounterMode over finish_training plus the part it cannot see: what total_flops charges


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
    flops: float | None = None  # training FLOPs spent so far, for adapters that report what each step ran
    bytes_per_unit: float | None = None  # since the previous point, for adapters whose unit rate is learned


class SegmentationExample(Typed):
    example_bytes: list[int]
    example_starts: list[int]
    example_scores: list[float] | None
    chunk_length_counts: list[int]
    window: int


class EpochCap(Typed):
    max_epochs: float  # the suite's cap on epochs over the training split
    budget_steps: int  # the steps the budget alone would have bought (the run took fewer)


class RunRecord(Typed):
    format_version: int = RECORD_FORMAT_VERSION
    suite: str
    run_id: str
    config_hash: str
    model: ModelSpec
    trainer: TrainerSettings
    trainer_overrides: dict  # the keys the suite's model entry set
    budget_flops: float
    seed: int
    corpus: CorpusFacts
    eval: EvalSettings
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
    epoch_cap: EpochCap | None = None  # set when the suite's max_epochs stopped the run short of its budget
    training_flops: float
    auxiliary_training_flops: float
    count_auxiliary_flops: bool
    total_flops: float  # training + auxiliary training + calibration (older records: the first two)
    training_flops_per_byte: float
    calibration: dict
    calibration_flops: CalibrationFlops | None = None  # older records: calibration was not charged
    cost_check: CostCheck | None = None  # runs sized to an inference cost (older records: harness.run.budget.cost_check_of)
    loss_curve: list[CurvePoint]
    val: Evaluation
    test: Evaluation
    test_variants: dict[str, Evaluation]
    test_sets: dict[str, TestSet] = Field(default_factory=dict)  # named extra test sets (older records: none)
    tokenizer: dict
    segmentation: SegmentationExample | None = None
    train_seconds: float
    resumed_at_step: int | None = None
    wall_seconds: float
    achieved_flops_per_s: float
    matmul_peak_flops_per_s: float  # the median of the measurements (harness.run.device.Peak)
    matmul_peak_range: list[float] | None = None  # their min and max (older records: not measured)
    threads: int | None = None  # torch's CPU threads (older records: not recorded)
    mfu: float
    device: str
    processes: int | None = None  # DDP processes of a run trained across several (then mfu is per process)
    warnings: list[str]
    versions: dict[str, str]
    tuning: dict | None = None  # the tuning trials that chose the trainer settings (harness.orchestrate.tuning)
    trained_as: str | None = None  # the tuning trial of this very config whose training this run is (trained once)


class RunFailure(Typed):
    """runs/RUN_ID/failure.json: a run that did not finish. A RunRecord is only ever a finished
    run; this small marker says why the run stopped, so the runner skips it (unless asked to
    retry) and the report lists it. `diverged`: the training loss stopped being finite;
    `failed`: the run raised an error that names its cause (e.g. a tokenizer that cannot be
    trained on the corpus)."""

    kind: Literal["diverged", "failed"]
    suite: str
    run_id: str
    config_hash: str
    model: str
    adapter: str
    budget_flops: float
    seed: int
    corpus: str
    step: int | None = None  # the optimizer step whose loss was not finite
    last_finite_loss: float | None = None  # the training loss of the step before it
    reason: str
    versions: dict[str, str]


def _from_format_2(raw: dict) -> dict:
    """Format 2 kept the adapter's preparation facts flat, with the auxiliary training FLOPs
    under "flops" and the patchers' histogram under "patch_size_counts"."""
    facts = dict(raw.get("preparation") or {})
    raw["preparation"] = {"seconds": facts.pop("seconds", 0.0), "auxiliary_flops": facts.pop("flops", 0.0),
                          "unit_length_counts": facts.pop("patch_size_counts", None), "facts": facts}
    raw["format_version"] = 3
    return raw


ATTENTION_WINDOW_ADAPTERS = ("bytes", "bpe", "sentencepiece", "hnet", "byteflow")


def _from_format_3(raw: dict) -> dict:
    """Format 3 called the built-in adapters' attention window `window` (now `attn_window`; the
    evaluation window is eval.window), in the patcher's entropy model too."""
    model = raw.get("model") or {}
    config = model.get("config")
    if isinstance(config, dict):
        if model.get("adapter") in ATTENTION_WINDOW_ADAPTERS and "window" in config:
            config["attn_window"] = config.pop("window")
        inner = config.get("entropy_model") if model.get("adapter") == "patcher" else None
        if isinstance(inner, dict) and "window" in inner:
            inner["attn_window"] = inner.pop("window")
    raw["format_version"] = 4
    return raw


MIGRATIONS = {2: _from_format_2, 3: _from_format_3}  # format n -> n + 1


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
    except OSError as e:
        raise HarnessError(f"{path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HarnessError(f"{path}: not a valid JSON record") from None
    return parse_record(raw, path)


def read_hashed_json(path: Path, remedy: str) -> dict:
    """The JSON object at `path` (suite.json, tuning.json), checked against its recorded hash; else
    a one-line HarnessError that names the file, what is wrong and `remedy`."""
    entry, problem = json_object(Path(path))
    if problem is not None:
        raise HarnessError(f"{path}: {problem}; {remedy}")
    note_unhashed(Path(path))
    return entry


def write_record(path: Path, record: RunRecord) -> None:
    # a single-process record, one of a model no factor crosses, or one trained as itself keeps
    # exactly the keys it always had
    exclude: dict = {key: True for key in ("processes", "trained_as") if getattr(record, key) is None}
    if not record.model.factors:
        exclude["model"] = {"factors"}
    write_json_atomic(path, record.model_dump(mode="json", exclude=exclude or None))


def read_failure(path: Path) -> RunFailure | None:
    """The failure marker at `path`, or None if there is none or it cannot be read (a marker
    that cannot be read is as good as none: the run is attempted again)."""
    try:
        return RunFailure(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return None


def read_failures(results_dir: Path) -> list[RunFailure]:
    """The failure markers under results_dir/runs, sorted by run id."""
    found = (read_failure(p) for p in sorted((results_dir / "runs").glob("*/failure.json")))
    return [f for f in found if f is not None]


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that a killed writer left in `folder` (`.NAME.tmpPID` of
    save_checkpoint_atomic, `.NAME.XXXX.tmp` of write_json_atomic). Only for a folder that no
    other process is writing to (a run folder whose lock is held)."""
    removed = [p for p in folder.glob(".*.tmp*") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "harness": __version__}


def read_suite_records(results_dir: Path, on_error: Callable[[str], None] | None = None) -> list[RunRecord]:
    """Every finished run record under results_dir/runs, sorted by run id. With `on_error`, a
    record that cannot be read is skipped and its error (one line) handed to on_error."""
    records = []
    for path in sorted((results_dir / "runs").glob("*/record.json")):
        try:
            records.append(read_record(path))
        except HarnessError as e:
            if on_error is None:
                raise
            on_error(str(e))
    return records
