"""The GPU study suite and its smoke version: both load, they declare the same models (so the
smoke run checks what the GPU suite will run), the same protocol, and the GPU suite's corpus is
large enough that the scaling rule never repeats its training data."""

import os
import subprocess
import sys
import time

import pytest

from harness.orchestrate.suite import load_suite
from tests.conftest import ROOT

GPU = ROOT / "suites" / "study_gpu.yaml"
SMOKE = ROOT / "suites" / "study_gpu_smoke.yaml"


@pytest.fixture(scope="module")
def suites():
    return load_suite(GPU), load_suite(SMOKE)


def _keys(config: dict) -> dict:
    """A config's keys, nested configs (the entropy model's) by their own keys."""
    return {k: _keys(v) if isinstance(v, dict) else None for k, v in config.items()}


def test_the_two_suites_declare_the_same_models_with_the_same_keys(suites):
    gpu, smoke = suites
    assert [(m.name, m.adapter) for m in gpu.models] == [(m.name, m.adapter) for m in smoke.models]
    for g, s in zip(gpu.models, smoke.models):
        assert _keys(g.config) == _keys(s.config), g.name
        assert g.trainer == s.trainer, g.name
    study = load_suite(ROOT / "suites" / "study_v2.yaml")  # the CPU ladder's twelve models
    assert [(m.name, m.adapter) for m in gpu.models] == [(m.name, m.adapter) for m in study.models]


def test_the_smoke_suite_follows_the_same_protocol(suites):
    gpu, smoke = suites
    assert smoke.inference_scaling.exponent == gpu.inference_scaling.exponent == 0.5
    assert smoke.tune is not None and gpu.tune is not None
    assert (smoke.tune.factor, smoke.tune.seeds) == (gpu.tune.factor, gpu.tune.seeds)
    assert set(smoke.tune.budgets) <= set(smoke.budgets) and set(gpu.tune.budgets) <= set(gpu.budgets)
    assert smoke.max_epochs == gpu.max_epochs is not None
    assert smoke.references is not None and gpu.references is not None
    assert smoke.references.prime_bytes < smoke.split.train_bytes
    assert gpu.count_auxiliary_flops == smoke.count_auxiliary_flops
    assert gpu.sizing == smoke.sizing  # the smoke suite sizes as the GPU suite will
    assert gpu.budgets == [1e17, 3e17, 1e18, 3e18, 1e19] and len(gpu.seeds) == 3
    assert gpu.executor.kind == "slurm" and gpu.executor.gpus_per_run == 1


def test_no_gpu_run_passes_one_epoch_of_its_training_split(suites):
    gpu, _ = suites
    for budget in gpu.budgets + gpu.tune.budgets:
        bytes_seen = budget / (3 * gpu.inference_target(budget))  # what the rule's size buys
        assert bytes_seen <= gpu.split.train_bytes, budget
    top = max(gpu.budgets)
    assert top / (3 * gpu.inference_target(top)) > 1e10 * 0.95  # the header's arithmetic: about 1e10 bytes at 1e19
    assert top / (3 * gpu.inference_target(top)) > 100 * 1e8 * 0.9  # enwik8 (1e8 bytes) would repeat about 100 times


def test_the_smoke_suite_dry_runs(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(SMOKE), "--dry-run", "--quiet",
                             "--results", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "to run (dry run)" in result.stdout + result.stderr
    assert (tmp_path / "study_gpu_smoke" / "suite.json").exists()
    print(f"dry run in {time.perf_counter() - started:.1f}s")
