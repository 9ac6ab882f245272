"""`harness export`: a bpe run as a transformers model + tokenizer whose logits match the
harness model's (float32, max abs difference < 1e-4)."""

import argparse
import os

import pytest
import torch


from harness.run import data

from harness.api import registry
from harness.errors import HarnessError
from harness.commands.export import add_parser, export_run
from harness.run.checkpoint import save_weights
from harness.run.records import write_record
from tests.checks import record_for
from tests.conftest import context

TRAIN = data.embedded_corpus("pydoc-topics", 50000)
TEXT = "The quick brown fox: def f(x): return x ** 2  # café, naïve, 😀\n\n   Spaces and\ttabs."


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


def make_run(run_dir, adapter="bpe", **config):
    """A finished run directory (record.json + model.safetensors) of a prepared model whose weights,
    norm gains included, are random, so every mapped tensor matters."""
    config = {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, **config}
    torch.manual_seed(0)
    model = registry.build(adapter, config)
    model.prepare(TRAIN, context())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.2)
    run_dir.mkdir(parents=True)
    save_weights(run_dir / "model.safetensors", model.state_dict())
    write_record(run_dir / "record.json", record_for(model, run_dir.name))
    return model.eval()


@pytest.mark.parametrize(("window", "architecture"), [(0, "LlamaForCausalLM"), (8, "MistralForCausalLM")])
def test_exported_model_matches_the_harness_logits(tmp_path, window, architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_run(tmp_path / "run", attn_window=window)
    export_run(tmp_path / "run", tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(hf_model).__name__ == architecture
    assert hf_model.dtype == torch.float32

    # the exported tokenizer gives the harness's ids: BOS + the window's tokens
    vocab = model.vocabulary()
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == [vocab.bos_id] + vocab.encode([TEXT.encode()])[0]
    assert len(ids) > 2 * max(window, 8)  # long enough for the sliding window to matter
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert hf_model.config.bos_token_id == tokenizer.bos_token_id == vocab.bos_id

    batch = torch.tensor([ids])
    with torch.no_grad():
        ours = model.logits(batch)
        theirs = hf_model(batch).logits
    assert ours.abs().max() > 1  # weights are not near zero: the comparison has teeth
    assert (ours - theirs).abs().max().item() < 1e-4

    # the NLL of the text's bytes is the same whichever model scores it
    window_bytes = torch.tensor([list(TEXT.encode())])
    targets = batch[0, 1:]
    hf_nll = torch.nn.functional.cross_entropy(theirs[0, :-1], targets, reduction="sum")
    with torch.no_grad():
        assert model(window_bytes).sum().item() == pytest.approx(hf_nll.item(), abs=1e-3)


def test_export_subcommand(tmp_path):
    make_run(tmp_path / "run")
    parser = argparse.ArgumentParser(prog="harness")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tmp_path / "run"), str(tmp_path / "out")])
    args.func(args)
    assert {"config.json", "model.safetensors", "tokenizer.json", "harness_export.json"} <= set(os.listdir(tmp_path / "out"))



def test_export_says_the_trained_context_and_writes_a_model_card(tmp_path):
    import json

    from transformers import AutoTokenizer

    make_run(tmp_path / "run")  # its record: windows of 64 bytes, test bpb 1.0
    export_run(tmp_path / "run", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 65  # BOS + at most one token per byte of a 64-byte window
    assert config["eos_token_id"] is None  # the BPE vocabulary has BOS only
    assert AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True).model_max_length == 65
    facts = json.loads((tmp_path / "out" / "harness_export.json").read_text())
    assert facts["trained_window_bytes"] == 64 and facts["max_tokens"] == 65 and facts["eos_token_id"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    for expected in ("# run", "Adapter: `bpe`", "sha256 `" + "0" * 64 + "`", "windows of **64 bytes**",
                     "**1.0000 bits per byte**", "no EOS token (BOS only)",
                     f"harness export {tmp_path / 'run'} {tmp_path / 'out'}"):
        assert expected in card, expected


def test_export_refuses_other_adapters_and_missing_runs(tmp_path):
    make_run(tmp_path / "sp", adapter="sentencepiece", vocab_size=400)
    with pytest.raises(HarnessError, match="adapter 'sentencepiece' cannot be exported"):
        export_run(tmp_path / "sp", tmp_path / "out")
    with pytest.raises(HarnessError, match="no such record"):
        export_run(tmp_path / "nothing", tmp_path / "out")


def test_the_model_card_names_the_suite_file_the_run_was_made_from(tmp_path, write_suite):
    import json

    from harness.cli import main
    from tests.conftest import tiny_suite

    suite = write_suite(tiny_suite(models=[{"name": "bpe", "adapter": "bpe", "config": {
        "vocab_size": 300, "d_model": 32, "n_layers": 1, "n_heads": 2}}]))
    assert main(["run", str(suite), "--results", str(tmp_path / "results"), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "results" / "tiny" / "suite.json").read_text())["suite_file"] == str(suite)
    (run_dir,) = (tmp_path / "results" / "tiny" / "runs").iterdir()
    export_run(run_dir, tmp_path / "out")
    assert f"harness run {suite}; run {run_dir.name}" in (tmp_path / "out" / "README.md").read_text()
