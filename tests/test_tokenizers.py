"""The tokenizer baselines (bpe, sentencepiece): lossless round trips on arbitrary bytes,
FLOP counts against FlopCounterMode, the causality audit, errors and the tokenizer cache."""

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from baselines.bpe import BYTE_SYMBOLS
from harness.run.references import raw_byte_metrics
from harness.run import data
from harness.api import registry
from harness.analysis.audit import assert_causal, causality_audit
from harness.errors import HarnessError
from harness.modeling.flops import measure_forward
from harness.orchestrate.suite import load_suite
from tests.conftest import context, tiny_suite

TRAIN = data.embedded_corpus("pydoc-topics", 60000)
HELD_OUT = data.embedded_corpus("pydoc-topics", 90000)[60000:]
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2}
TOKENIZERS = {
    "bpe": ("bpe", {"vocab_size": 320}),
    "sp-unigram": ("sentencepiece", {"vocab_size": 400}),
    "sp-bpe": ("sentencepiece", {"vocab_size": 400, "model_type": "bpe"}),
}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness-cache")
    previous = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        del os.environ["HARNESS_CACHE_DIR"]
    else:
        os.environ["HARNESS_CACHE_DIR"] = previous


def build(kind: str, **extra):
    adapter, config = TOKENIZERS[kind]
    return registry.build(adapter, {**config, **MODEL, **extra})


@pytest.fixture(scope="module")
def prepared(cache_root):
    """One trained model per tokenizer kind (first preparation: a cache miss)."""
    models, infos = {}, {}
    for kind in TOKENIZERS:
        torch.manual_seed(0)
        models[kind] = build(kind)
        infos[kind] = models[kind].prepare(TRAIN, context())
    return models, infos


# --- lossless round trips -----------------------------------------------------------
FRAGMENTS = [b"the", b" the", b"def", b"_", b" ", b"   ", b"\n", b"\n\n", b"\t", b"\r\n", b"\x00", b"\xff", b"\x80",
             b"\xc3", b"\xc3\xa9", b"\xe2\x80\x99", b"\xe2\x96\x81", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80",
             b"<|bos|>", b"<s>", b"<unk>", b"<0x41>", b"e", b"1234", b"**"]
byte_strings = st.binary(max_size=200) | st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_round_trip_on_arbitrary_bytes(prepared, kind):
    vocab = prepared[0][kind].vocabulary()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(byte_strings)
    @example(b"")
    @example(b"\x00" * 700)
    @example(b"a" * 5000)
    @example(b" " * 3000)
    @example(b"\xe2\x96\x81" * 50 + b"x")
    @example(bytes(range(256)) * 3)
    @example(TRAIN[:3000])
    def check(x):
        ids = vocab.encode([x])[0]
        assert vocab.decode(ids) == x
        assert all(vocab.lengths[i] > 0 for i in ids)
        assert vocab.bos_id not in ids

    check()


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_valid_text_is_the_library_tokenization(prepared, kind):
    """On valid UTF-8 (without SentencePiece's U+2581) the ids are the library's own, and
    the library decodes them back to the text."""
    model = prepared[0][kind]
    vocab = model.vocabulary()
    if kind == "bpe":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(model.tokenizer_state["tokenizer"])
        library_encode = lambda t: tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
        library_decode = tokenizer.decode
    else:
        import base64

        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=base64.b64decode(model.tokenizer_state["tokenizer"]))
        library_encode, library_decode = processor.encode, processor.decode

    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=120).filter(lambda t: "\u2581" not in t and "<|bos|>" not in t))
    @example(HELD_OUT[:2000].decode("utf-8", "ignore"))
    def check(text):
        ids = vocab.encode([text.encode()])[0]
        assert ids == library_encode(text)
        assert library_decode(ids) == text

    check()


def test_bpe_byte_symbols_are_the_bytelevel_alphabet():
    from tokenizers import pre_tokenizers

    assert sorted(BYTE_SYMBOLS) == sorted(pre_tokenizers.ByteLevel.alphabet())
    text = "a é\n\t\x00€😀"
    symbols = "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text))
    assert symbols == "".join(BYTE_SYMBOLS[b] for b in text.encode())


# --- scoring ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
def test_nll_sits_on_token_ends_and_padding_is_never_scored(prepared, kind):
    model = prepared[0][kind].eval()
    windows = data.windows(HELD_OUT, 96, 6)
    with torch.no_grad():
        batch = model(windows)
        alone = torch.cat([model(w[None]) for w in windows])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    ids, mask, ends = model.tokenize(windows)
    assert mask.sum(1).min() < mask.shape[1], "the batch should need padding"
    for row in range(len(windows)):
        token_ends = set(ends[row][mask[row]].tolist())
        assert token_ends == set(batch[row].nonzero().flatten().tolist())
    # the per-byte sum is the sum of the token NLLs computed from the logits directly
    with torch.no_grad():
        inputs = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=model.vocabulary().bos_id)
        token_nll = torch.nn.functional.cross_entropy(model.logits(inputs).transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(batch.sum(1), (token_nll * mask).sum(1), atol=1e-4, rtol=1e-5)


def test_training_step_gives_gradients(prepared):
    model = prepared[0]["bpe"].train()
    loss = model(data.windows(TRAIN, 64, 4)).mean()
    loss.backward()
    assert model.embed.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


# --- FLOPs ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
@pytest.mark.parametrize("attention_window", [0, 16])
def test_flops_match_flop_counter_on_text(prepared, kind, attention_window):
    """The formula at the padded token length actually run, against FlopCounterMode on a
    batch of real text windows (within 2%; it is exact)."""
    model = prepared[0][kind]
    if attention_window:
        model = build(kind, attn_window=attention_window)
        model.load_state_dict(prepared[0][kind].state_dict())
    windows = data.windows(HELD_OUT, 128, 8)
    ids, _, _ = model.tokenize(windows)
    assert ids.shape[1] > max(attention_window, 1)
    counted = measure_forward(model.eval(), windows)
    analytic = len(windows) * model.sequence_flops(ids.shape[1])["total"]
    assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)


@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
def test_flops_per_byte_matches_unpadded_windows_of_the_training_split(prepared, kind):
    """flops_per_byte(W) is the formula at tokens_per_window(W) positions, divided by W.
    Over every 128-byte window of the training split, each run on its own (no padding),
    the mean FLOPs per byte agree within 2%; the formula is checked against
    FlopCounterMode on single windows (any token count) here and on padded batches above."""
    model = prepared[0][kind].eval()
    windows = data.windows(TRAIN, 128)
    token_counts = [len(ids) for ids in model.vocabulary().encode([bytes(w.tolist()) for w in windows])]
    for w, count in list(zip(windows, token_counts))[:3]:
        assert measure_forward(model, w[None]) == pytest.approx(model.sequence_flops(count)["total"], rel=1e-9)
    assert sum(token_counts) / len(windows) == pytest.approx(model.tokens_per_window(128), rel=0.01)
    unpadded = sum(model.sequence_flops(count)["total"] for count in token_counts) / windows.numel()
    analytic = model.flops_per_byte(128)["total"]
    assert abs(analytic - unpadded) <= 0.02 * unpadded, (analytic, unpadded)
    assert analytic == pytest.approx(model.sequence_flops(model.tokens_per_window(128))["total"] / 128)


def test_flops_before_prepare_assume_one_token_per_byte():
    model = build("bpe")
    assert model.tokens_per_window(100) == 100
    assert model.units_per_byte() == 1.0


# --- causality --------------------------------------------------------------------------
AUDIT_WINDOW = (b"The quick brown fox jumps over the lazy dog; def f(x): return x ** 2\n\n"
                b"   Identifiers such as __init__ are reserved.")


def audit_positions() -> list[int]:
    w = AUDIT_WINDOW
    inside = [w.index(b"quick") + 2, w.index(b"jumps") + 3, w.index(b"Identifiers") + 5]
    starts = [0, w.index(b"brown"), w.index(b"return"), w.index(b"__init__")]
    spaces = [w.index(b" over"), w.index(b"   Ident"), w.index(b"\n\n")]
    return inside + starts + spaces + [len(w) - 1]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_causality_audit_passes(prepared, kind):
    results = assert_causal(prepared[0][kind], AUDIT_WINDOW, positions=audit_positions())
    # the audit is not trivial: most perturbations leave a stable prefix to compare
    assert sum(r.stable_prefix > 0 for r in results) >= len(results) - 1


class PeekingBPE(registry.get("bpe")):
    """A deliberately broken tokenizer model: input position i holds token i+1."""

    def forward(self, windows):
        ids, mask, ends = self.tokenize(windows)
        inputs = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=self.vocabulary().bos_id)
        nll = torch.nn.functional.cross_entropy(self.logits(inputs).transpose(1, 2), ids, reduction="none") * mask
        return torch.zeros(windows.shape).scatter_add_(1, ends, nll)


def test_causality_audit_catches_a_token_leak(prepared):
    model = PeekingBPE(PeekingBPE.Config(**TOKENIZERS["bpe"][1], **MODEL))
    model.load_state_dict(prepared[0]["bpe"].state_dict())
    results = causality_audit(model, AUDIT_WINDOW, positions=audit_positions())
    assert any(not r.passed(1e-5) for r in results)


# --- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(("adapter", "smallest"), [("bpe", 257), ("sentencepiece", 258)])
def test_vocab_smaller_than_byte_alphabet_is_a_clear_error(adapter, smallest, write_suite):
    with pytest.raises(HarnessError, match=f"vocab_size {smallest - 1} is smaller than the byte alphabet"):
        registry.build(adapter, {"vocab_size": smallest - 1})
    registry.build(adapter, {"vocab_size": smallest})
    path = write_suite(tiny_suite(models=[{"name": "t", "adapter": adapter, "config": {"vocab_size": 100}}]))
    with pytest.raises(HarnessError) as error:
        load_suite(path)
    assert "models[0].config: vocab_size 100 is smaller than the byte alphabet" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("adapter", "config", "key"), [
    ("bpe", {"merges": 10}, "merges"),
    ("sentencepiece", {"model_type": "word"}, "model_type"),
])
def test_unknown_tokenizer_option_is_a_validation_error(adapter, config, key, write_suite):
    with pytest.raises(ValidationError):
        registry.build(adapter, config)
    with pytest.raises(HarnessError, match=rf"models\[0\]\.config\.{key}: "):
        load_suite(write_suite(tiny_suite(models=[{"name": "t", "adapter": adapter, "config": config}])))


def test_tokenizer_that_fails_to_train_is_a_one_line_error(cache_root):
    model = registry.build("sentencepiece", {"vocab_size": 5000, **MODEL})
    with pytest.raises(HarnessError, match="sentencepiece could not train a unigram tokenizer of vocab_size 5000") as error:
        model.prepare(TRAIN[:3000], context())
    assert "\n" not in str(error.value)


# --- cache, checkpoints, metrics ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
def test_second_prepare_is_a_cache_hit_with_the_same_tokenizer(prepared, cache_root, kind):
    models, infos = prepared
    assert infos[kind].facts["tokenizer_cache_hit"] is False
    again = build(kind)
    info = again.prepare(TRAIN, context(seed=3)).facts  # another seed shares the tokenizer
    assert info["tokenizer_cache_hit"] is True
    assert info["tokenizer_train_seconds"] == infos[kind].facts["tokenizer_train_seconds"] > 0
    assert again.tokenizer_state == models[kind].tokenizer_state
    assert os.path.dirname(info["tokenizer_cache_file"]) == str(cache_root / "tokenizers")
    # other data or other settings: a new tokenizer
    assert build(kind).prepare(TRAIN[:30000], context()).facts["tokenizer_cache_hit"] is False


def test_other_settings_miss_the_cache(prepared):
    assert build("bpe", min_frequency=3).prepare(TRAIN, context()).facts["tokenizer_cache_hit"] is False


@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
def test_tokenizer_bytes_trains_on_the_head_of_the_split_only(cache_root, kind):
    """A capped tokenizer is the one trained on the split's first N bytes, and never shares a cache
    entry with the uncapped tokenizer of those same bytes."""
    head = TRAIN[:30000]
    capped = build(kind, tokenizer_bytes=len(head))
    facts = capped.prepare(TRAIN, context()).facts
    assert facts["tokenizer_settings"]["tokenizer_bytes"] == len(head)
    direct = build(kind)
    assert direct.prepare(head, context()).facts["tokenizer_cache_file"] != facts["tokenizer_cache_file"]
    assert capped.tokenizer_state["tokenizer"] == direct.tokenizer_state["tokenizer"]
    uncapped = build(kind)
    uncapped.prepare(TRAIN, context())
    assert uncapped.tokenizer_state["tokenizer"] != capped.tokenizer_state["tokenizer"]


@pytest.mark.parametrize("kind", ["bpe", "sp-unigram"])
def test_checkpoint_restores_the_tokenizer(prepared, kind):
    model = prepared[0][kind].eval()
    fresh = build(kind)
    fresh.load_state_dict(model.state_dict())
    windows = data.windows(HELD_OUT, 64, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(windows), model(windows))
    assert fresh.units_per_byte() == model.units_per_byte() < 1


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_tokenizer_metrics(prepared, kind):
    model = prepared[0][kind]
    metrics = model.tokenizer_metrics(HELD_OUT, window=128)
    assert metrics["vocab_size"] == model.vocabulary().size <= model.config.vocab_size
    assert 1.2 < metrics["bytes_per_token_test"] < 4
    assert metrics["bytes_per_token_test_windows"] < metrics["bytes_per_token_test"]  # window edges cut words
    assert 0.2 < metrics["vocab_used_test"] <= 1
    assert metrics["tokenizer_train_seconds"] > 0 and metrics["encode_mb_per_s"] > 0
    raw = raw_byte_metrics(HELD_OUT)
    assert raw["vocab_size"] == 256 and raw["bytes_per_token_test"] == 1.0 and 0 < raw["vocab_used_test"] < 1
