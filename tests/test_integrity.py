"""Issue 33's hostile trials: no artifact is used unless it is the one that was written (damage by
64 random bytes written into the middle of a file, not only truncation), every failure inside
tuning is recorded like a run's, and bad input is refused before expensive work. Each ends in a
rebuild whose result equals an undamaged run's, or in one line naming the file."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from harness.api import registry
from harness.cli import main
from harness.errors import HarnessError
from harness.orchestrate import tuning
from harness.orchestrate.runner import run_suite
from harness.orchestrate.suite import load_suite
from harness.orchestrate.tuning import tune_suite
from harness.analysis.tuning_report import tuning_section
from harness.run import pipeline
from harness.run.checkpoint import load_checkpoint, load_weights, save_weights
from harness.run.data import embedded_corpus, windows
from harness.run.records import read_failure, read_record, write_record
from harness.run.references import cached_references
from harness.run.train import Diverged
from harness import storage
from harness.storage import file_damage, hash_path, read_cache_entry, write_json_atomic
from tests.checks import record_for
from tests.conftest import SMALL_CONFIGS, context, tiny_suite

BUDGET = 1e9  # a few training steps of the tiny models: the trials are about files, not training
RUN = "bytes__C1.00e09__s0"


def overwrite_middle(path: Path, seed: int = 0) -> None:
    """64 random bytes written over the middle of the file (its length unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - 32
    data[middle:middle + 64] = random.Random(seed).randbytes(64)
    path.write_bytes(bytes(data))


def cli(args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(status: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), err
    return lines[0]


def run_args(path: Path, results: Path, *extra) -> list:
    return ["run", path, "--results", results, "--quiet", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A tiny suite run once, undisturbed: the result every rebuild must equal."""
    root = tmp_path_factory.mktemp("straight")
    (root / "suite.yaml").write_text(yaml.safe_dump(tiny_suite(budgets=[BUDGET]), sort_keys=False))
    return run_suite(root / "suite.yaml", root / "results", "cpu", show_progress=False, save_every_s=0)


# ---- the hash beside a file ------------------------------------------------------------------

def test_a_hash_is_written_beside_the_file_and_catches_an_overwrite_in_the_middle(tmp_path, capsys, monkeypatch):
    path = tmp_path / "entry.json"
    write_json_atomic(path, {"text": "x" * 500}, hashed=True)
    assert hash_path(path).read_text().split() == [storage.file_sha256(path), "entry.json"]  # as sha256sum -c reads it
    assert file_damage(path) is None and read_cache_entry(path) == {"text": "x" * 500}
    overwrite_middle(path)
    assert "recorded in entry.json.sha256" in file_damage(path)
    assert read_cache_entry(path) is None and "rebuilding it" in capsys.readouterr().err
    # a file from before hashes were kept is used, with a note the first time only
    monkeypatch.setattr(storage, "_unhashed_noted", False)
    write_json_atomic(path, {"a": 1})
    hash_path(path).unlink()
    assert read_cache_entry(path) == {"a": 1} and read_cache_entry(path) == {"a": 1}
    assert capsys.readouterr().err.count("harness: note:") == 1


@pytest.mark.parametrize("killed", ["before the rename", "after the rename"])
def test_a_process_killed_between_a_file_and_its_hash_leaves_a_file_that_matches(tmp_path, monkeypatch, killed):
    path = tmp_path / "partial.json"
    write_json_atomic(path, {"step": 1}, hashed=True)
    calls = []

    def write_hashes(*args):
        calls.append(args)
        if killed == "after the rename" and len(calls) == 2:
            raise KeyboardInterrupt  # the second listing never comes
        return real_write_hashes(*args)

    def rename(source, target):
        if killed == "before the rename" and Path(target) == path:
            raise KeyboardInterrupt
        return real_replace(source, target)

    real_write_hashes, real_replace = storage._write_hashes, storage.os.replace
    monkeypatch.setattr(storage, "_write_hashes", write_hashes)
    monkeypatch.setattr(storage.os, "replace", rename)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"step": 2}, hashed=True)
    monkeypatch.undo()
    assert file_damage(path) is None
    assert json.loads(path.read_text()) == {"step": 1 if killed == "before the rename" else 2}


# ---- resumable state --------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def test_a_damaged_partial_pt_is_discarded_and_the_rerun_equals_an_undamaged_run(straight, write_suite, tmp_path,
                                                                                   capsys, monkeypatch):
    path = write_suite(tiny_suite(budgets=[BUDGET]))

    def interrupt(*args, **kwargs):  # training is done and partial.pt holds its last saved step
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "evaluate_run", interrupt)
        with pytest.raises(Interrupted):
            run_suite(path, tmp_path / "results", "cpu", show_progress=False, save_every_s=0)
    partial = tmp_path / "results" / "tiny" / "runs" / RUN / "partial.pt"
    assert hash_path(partial).exists()
    overwrite_middle(partial)
    status, out, err = cli(run_args(path, tmp_path / "results", "--save-every", "0"), capsys)
    assert status == 0, err
    assert f"warning: {RUN}: {partial}: its sha256" in out and "deleted it, the run starts over" in out
    rerun = read_record(partial.parent / "record.json")
    undamaged = read_record(straight / "runs" / RUN / "record.json")
    assert rerun.resumed_at_step is None and rerun.steps > 2
    assert rerun.loss_curve == undamaged.loss_curve and rerun.test.window_nll_nats == undamaged.test.window_nll_nats
    assert not partial.exists() and not hash_path(partial).exists()


# ---- a finished run's weights ---------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run folder as a finished run leaves it (record.json, model.safetensors and its hash)."""
    run_dir = tmp_path / "run"
    model = registry.build("bytes", SMALL_CONFIGS["bytes"])
    write_record(run_dir / "record.json", record_for(model))
    save_weights(run_dir / "model.safetensors", model.state_dict())
    return run_dir


@pytest.mark.parametrize("damage", ["64 bytes in the middle", "truncated", "no hash and truncated"])
def test_damaged_weights_are_one_line_naming_the_file_in_export_segment_lm_eval_and_load(finished_run, tmp_path,
                                                                                          capsys, damage):
    from harness.lm_eval_plugin import HarnessLM

    weights = finished_run / "model.safetensors"
    if damage == "64 bytes in the middle":
        overwrite_middle(weights)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if damage.startswith("no hash"):  # safetensors' own header check still refuses it
        hash_path(weights).unlink()
    expected = "its sha256" if "hash" not in damage else "not a loadable safetensors file"
    for args in (["export", finished_run, tmp_path / "exported"], ["segment", finished_run, "--text", "some text"]):
        line = one_line_error(*cli(args, capsys)[::2])
        assert f"{weights}: {expected}" in line
    with pytest.raises(HarnessError, match=f"model.safetensors: {expected}"):
        HarnessLM(pretrained=str(finished_run), device="cpu")
    with pytest.raises(HarnessError, match=f"model.safetensors: {expected}"):
        load_checkpoint(finished_run)


def test_weights_of_a_run_from_before_in_model_pt_still_load(finished_run, capsys, monkeypatch):
    weights = load_weights(finished_run / "model.safetensors")
    torch.save(weights, finished_run / "model.pt")
    storage.remove_hashed(finished_run / "model.safetensors")
    monkeypatch.setattr(storage, "_unhashed_noted", False)
    model = load_checkpoint(finished_run)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert "model.pt has no model.pt.sha256 beside it" in capsys.readouterr().err


def test_every_adapter_round_trips_through_safetensors(tmp_path):
    """Tensors as tensors, an adapter's extra state (a trained tokenizer, a measured rate) as JSON
    metadata: the rebuilt model is the saved one, scoring the same."""
    train = embedded_corpus("pydoc-topics", 40_000)
    batch = windows(train[:4096], 64)[:2]
    assert set(SMALL_CONFIGS) == set(registry.available())
    for name, config in SMALL_CONFIGS.items():
        torch.manual_seed(0)
        model = registry.build(name, config)
        model.prepare(train, context())
        path = tmp_path / f"{name}.safetensors"
        save_weights(path, model.state_dict())
        again = registry.build(name, config)
        again.load_state_dict(load_weights(path))
        saved, loaded = model.state_dict(), again.state_dict()
        assert saved.keys() == loaded.keys(), name
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == loaded[key].dtype and torch.equal(value.nan_to_num(), loaded[key].nan_to_num()), key
            else:
                assert value == loaded[key], key
        with torch.no_grad():
            assert torch.equal(model.eval()(batch), again.eval()(batch)), name


# ---- caches -----------------------------------------------------------------------------------

def tokenizer_cache(tmp_path: Path) -> Path:
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("bpe-*.json")
    return entry


@pytest.mark.parametrize("damage", ["64 bytes in the middle", "one 0xff byte", "one 0xff byte, no hash"])
def test_a_damaged_tokenizer_cache_is_rebuilt_to_the_same_tokenizer(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    train = embedded_corpus("pydoc-topics", 40_000)
    first = registry.build("bpe", SMALL_CONFIGS["bpe"])
    first.prepare(train, context())
    cache = tokenizer_cache(tmp_path)
    if damage == "64 bytes in the middle":
        overwrite_middle(cache)
    else:
        raw = bytearray(cache.read_bytes())
        raw[len(raw) // 2] = 0xFF
        cache.write_bytes(bytes(raw))
    if damage.endswith("no hash"):
        hash_path(cache).unlink()
    capsys.readouterr()
    again = registry.build("bpe", SMALL_CONFIGS["bpe"])
    facts = again.prepare(train, context()).facts
    assert f"harness: warning: {cache}: " in capsys.readouterr().err
    assert facts["tokenizer_cache_hit"] is False
    rebuilt = {k: v for k, v in again.get_extra_state().items() if k != "train_seconds"}
    assert rebuilt == {k: v for k, v in first.get_extra_state().items() if k != "train_seconds"}
    assert file_damage(cache) is None and read_cache_entry(cache)["tokenizer"] == rebuilt["tokenizer"]


def test_a_tokenizer_cache_edited_into_valid_json_is_rebuilt_and_the_run_equals_an_undamaged_one(write_suite, tmp_path,
                                                                                              monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    bpe = {"name": "bpe", "adapter": "bpe", "config": SMALL_CONFIGS["bpe"]}
    path = write_suite(tiny_suite(models=[bpe], budgets=[BUDGET]))
    status, _, err = cli(run_args(path, tmp_path / "first"), capsys)
    assert status == 0, err
    cache = tokenizer_cache(tmp_path)
    entry = json.loads(cache.read_text())
    tokenizer = json.loads(entry["tokenizer"])
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][: len(tokenizer["model"]["merges"]) // 4]
    entry |= {"tokenizer": json.dumps(tokenizer), "bytes_per_token": entry["bytes_per_token"] * 3}
    cache.write_text(json.dumps(entry))
    status, out, err = cli(run_args(path, tmp_path / "second"), capsys)
    assert status == 0, err
    assert f"harness: warning: {cache}: its sha256" in err and "rebuilding it" in err
    first, second = (read_record(tmp_path / folder / "tiny" / "runs" / "bpe__C1.00e09__s0" / "record.json")
                     for folder in ("first", "second"))
    assert second.preparation.facts["tokenizer_cache_hit"] is False
    assert second.test.window_nll_nats == first.test.window_nll_nats and second.test.bpb == first.test.bpb


def test_a_damaged_reference_cache_is_recomputed_to_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    data = embedded_corpus("pydoc-topics", 12_000)
    train, test = data[:8192], windows(data[8192:], 64)[:8]
    lines = []
    first = cached_references(train, test, log=lines.append)
    (cache,) = (tmp_path / "cache" / "references").glob("*.json")
    overwrite_middle(cache)
    again = cached_references(train, test, log=lines.append)
    assert any(line.startswith(f"warning: {cache}: its sha256") for line in lines)
    drop = ("compute_seconds",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in first.items() if k not in drop}


# ---- tuning -----------------------------------------------------------------------------------

TUNE = {"budgets": [2e9], "seeds": [0], "lr": [1e-3, 3e-3, 1e-2], "max_extensions": 2}


def bowl_execute(calls: list, diverge_above: float = math.inf):
    """An `execute` that trains nothing: val bpb is a bowl in log lr around 3e-3; above
    `diverge_above` the run diverges. Writes no record."""
    def execute(run, suite, corpus, device, peak, config_hash, run_dir, show_progress, save_every_s):
        calls.append(run.run_id)
        if run.trainer.lr > diverge_above:
            raise Diverged(22, 4.2, math.nan)
        from types import SimpleNamespace
        return SimpleNamespace(val=SimpleNamespace(bpb=2.0 + math.log(run.trainer.lr / 3e-3) ** 2))
    return execute


def test_a_diverging_trial_is_recorded_never_wins_and_the_search_goes_on(write_suite, tmp_path, monkeypatch):
    suite = load_suite(write_suite(tiny_suite(tune=TUNE | {"lr": [1e-3, 3e-3, 1e-2, 3e-2]})))
    calls = []
    monkeypatch.setattr(tuning, "execute", bowl_execute(calls, diverge_above=2e-2))
    (entry,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert entry["chosen"] == {"lr": 3e-3}
    diverged = next(t for t in entry["trials"] if t["lr"] == 3e-2)
    assert math.isnan(diverged["val_bpb"]) and "diverged at step 22" in diverged["failed"][0]
    failure = read_failure(tmp_path / "tuning" / "runs" / diverged["run_ids"][0] / "failure.json")
    assert failure.kind == "diverged" and failure.step == 22
    # tuning again: the failed trial is not trained again, and still loses
    calls.clear()
    (again,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert again["chosen"] == {"lr": 3e-3} and diverged["run_ids"][0] not in calls


def test_a_truncated_trial_record_is_trained_again(write_suite, tmp_path, monkeypatch, capsys):
    suite = load_suite(write_suite(tiny_suite(tune=TUNE)))
    monkeypatch.setattr(tuning, "execute", bowl_execute([]))
    (entry,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    trial = entry["trials"][0]["run_ids"][0]
    record = tmp_path / "tuning" / "runs" / trial / "record.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"suite": "tiny", "run_i')
    calls = []
    monkeypatch.setattr(tuning, "execute", bowl_execute(calls))
    (again,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert f"warning: {record}: not a valid JSON record; running {trial} again" in capsys.readouterr().out
    assert trial in calls and again["chosen"] == entry["chosen"]


@pytest.mark.parametrize("damage", ["64 bytes in the middle", "truncated, no hash", "garbled, no hash"])
def test_a_damaged_tuning_json_is_one_line_in_a_dry_run_and_the_report(write_suite, tmp_path, monkeypatch, capsys,
                                                                        damage):
    suite = load_suite(write_suite(tiny_suite(tune=TUNE)))
    monkeypatch.setattr(tuning, "execute", bowl_execute([]))
    tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    path = tmp_path / "tuning.json"
    if damage == "64 bytes in the middle":
        overwrite_middle(path)
    else:
        hash_path(path).unlink()
        path.write_text(path.read_text()[:100] if damage.startswith("truncated") else '{"entries": 3}')
    capsys.readouterr()
    assert tune_suite(suite, tmp_path, {}, None, 1.0, dry_run=True) == []
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and f"tuning: {path}: " in out and "untuned settings" in out
    (tmp_path / "plots").mkdir()
    assert tuning_section(tmp_path, tmp_path / "plots") == []
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"harness: warning: {path}: ")
    # and a real run writes it again
    tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert file_damage(path) is None and tuning_section(tmp_path, tmp_path / "plots")[0] == "## Tuning"


# ---- refused before work ------------------------------------------------------------------------

def test_a_huge_vocabulary_is_refused_at_load_naming_the_field(write_suite, tmp_path, capsys):
    path = write_suite(tiny_suite(models=[{"name": "bpe", "adapter": "bpe", "config": {"vocab_size": 10_000_000}}]))
    line = one_line_error(*cli(run_args(path, tmp_path / "results", "--dry-run"), capsys)[::2])
    assert f"{path}: models[0].config.vocab_size: Input should be less than or equal to 1048576" in line
    assert not (tmp_path / "results").exists()


def test_an_inference_target_no_size_meets_is_refused_at_dry_run_naming_file_and_key(write_suite, tmp_path, capsys):
    path = write_suite(tiny_suite(inference_flops_per_byte=10.0))
    line = one_line_error(*cli(run_args(path, tmp_path / "results", "--dry-run"), capsys)[::2])
    assert f"{path}: inference_flops_per_byte: model 'bytes' (bytes): no d_model" in line
    assert not (tmp_path / "results" / "tiny" / "suite.json").exists()  # before the reference rows


def test_slurm_without_slurm_is_refused_before_any_preparation(write_suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = write_suite(tiny_suite())
    line = one_line_error(*cli(run_args(path, tmp_path / "results", "--executor", "slurm"), capsys)[::2])
    assert "--executor slurm: no `srun` or `sbatch` on this machine's PATH" in line
    assert not (tmp_path / "results").exists()


# ---- any bytes ----------------------------------------------------------------------------------

def test_segment_takes_text_that_is_not_utf8(tmp_path, capsys):
    run_dir = tmp_path / "run"
    model = registry.build("megabyte", SMALL_CONFIGS["megabyte"])
    write_record(run_dir / "record.json", record_for(model))
    save_weights(run_dir / "model.safetensors", model.state_dict())
    raw = b"caf\xe9 cr\xe8me \xff\xfe ok"
    text = raw.decode("utf-8", "surrogateescape")  # how Python hands over argv that is not UTF-8
    status, out, err = cli(["segment", run_dir, "--text", text], capsys)
    assert status == 0 and "Traceback" not in err, err
    assert "\\xe9" in out and "\\xff" in out and f"\n{len(raw)} bytes" in out
