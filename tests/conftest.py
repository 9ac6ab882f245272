import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# trained tokenizers are cached; keep the tests' cache out of the working tree
os.environ.setdefault("HARNESS_CACHE_DIR", tempfile.mkdtemp(prefix="harness-test-cache-"))
# a run's process does not turn into local workers when the test machine is busy (tests that start
# several harness processes make it so); tests/test_scaleout.py checks the switch itself
os.environ["HARNESS_WORKERS_WHEN_BUSY"] = "0"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# One small config per adapter, for tests that must cover every adapter (a test asserts the
# list is complete); they are prepared on windows of SMALL_WINDOW bytes.
SMALL_WINDOW = 64
SMALL_CONFIGS = {
    "bytes": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "bpe": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2},
    "sentencepiece": {"vocab_size": 320, "character_coverage": 0.99, "d_model": 32, "n_layers": 1, "n_heads": 2},
    "megabyte": {"patch_size": 4, "d_embed": 8, "d_global": 32, "global_layers": 1, "global_heads": 2,
                 "d_local": 16, "local_layers": 1, "local_heads": 2},
    "patcher": {"d_local": 32, "d_global": 48, "n_heads_local": 2, "n_heads_global": 2, "local_window": 16,
                "calibration_bytes": 4096, "entropy_steps": 6, "entropy_batch_windows": 8, "entropy_holdout_bytes": 2048,
                "entropy_model": {"d_model": 16, "n_layers": 1, "n_heads": 2}},
    "spacebyte": {"d_local": 32, "d_global": 48, "n_heads_local": 2, "n_heads_global": 2, "local_window": 16,
                  "calibration_bytes": 4096},
    "byteflow": {"d_local": 32, "d_global": 32, "n_heads": 2, "global_heads": 2, "global_layers": 1, "attn_window": 16,
                 "rolling_window": 32, "calibration_windows": 16},
    "hnet": {"d_local": 32, "d_main": 48, "n_heads": 2, "main_heads": 2, "encoder_layers": 1, "main_layers": 1,
             "decoder_layers": 1, "attn_window": 16, "calibration_windows": 16},
}


def context(window: int = SMALL_WINDOW, seed: int = 0, **fields):
    """The run context an adapter gets from the runner (its auxiliary trainer included), for tests
    that prepare it directly."""
    import torch

    from harness.api import RunContext
    from harness.run.pipeline import AuxiliaryModelTrainer

    return RunContext(window=window, seed=seed, trainer=AuxiliaryModelTrainer(window, seed, torch.device("cpu")), **fields)


def tiny_suite(**overrides) -> dict:
    """A suite small enough to train in about a second."""
    suite = {
        "name": "tiny",
        "corpus": {"embedded": "pydoc-topics"},
        "split": {"train_bytes": 40000, "val_bytes": 4096, "test_bytes": 4096},
        "eval": {"window": 64, "max_windows": 16, "batch_windows": 16},
        "budgets": [2e9],
        "seeds": [0],
        "trainer": {"batch_windows": 8, "log_every": 2},
        "models": [{"name": "bytes", "adapter": "bytes", "config": {"d_model": 32, "n_layers": 1, "n_heads": 2}}],
    }
    suite.update(overrides)
    return suite


@pytest.fixture
def write_suite(tmp_path):
    def write(suite: dict, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(suite, sort_keys=False))
        return path

    return write


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions close (instead of pixels, their data is checked)."""
    import matplotlib.pyplot as plt

    real_close, closed = plt.close, []
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    yield closed
    for fig in closed:
        real_close(fig)
