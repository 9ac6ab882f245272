"""Run records: one JSON file per run, written atomically (temp file + rename),
so a record on disk is always whole (DESIGN.md section 5)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from harness import RECORD_FORMAT_VERSION, __version__
from harness.errors import HarnessError


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
    torch.save(state, temporary)
    os.replace(temporary, path)


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such record") from None
    except json.JSONDecodeError:
        raise HarnessError(f"{path}: not a valid JSON record") from None
    if record.get("format_version") != RECORD_FORMAT_VERSION:
        raise HarnessError(f"{path}: record format {record.get('format_version')}, this harness reads {RECORD_FORMAT_VERSION}")
    return record


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "harness": __version__}


def read_suite_records(results_dir: Path) -> list[dict]:
    """Every finished run record under results_dir/runs, sorted by run id."""
    paths = sorted((results_dir / "runs").glob("*/record.json"))
    return [read_record(p) for p in paths]
