"""Hashed byte n-gram embeddings (harness/modeling/hash_ngrams.py) as an option of every
byte-level adapter: the embedding of known n-grams against a hash computed here, causality
audits and FLOPs with the tables on, parameters, config checks, and tables off changing nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.analysis.audit import assert_causal, causality_audit
from harness.api import BOS, BYTE_VOCAB, registry
from harness.run import data
from harness.modeling.flops import measure_forward
from harness.modeling.hash_ngrams import HashNgramEmbedding
from harness.modeling.nn import Transformer, init_weights
from tests.conftest import SMALL_CONFIGS, context

BYTE_ADAPTERS = ["bytes", "megabyte", "patcher", "spacebyte", "byteflow", "hnet"]
NGRAMS = [3, 4, 5, 6, 7, 8]
BUCKETS = 97  # small and prime: collisions happen, and must not matter
TEXT = data.embedded_corpus("pydoc-topics", 40_000)
TRAIN, TEST = TEXT[:30_000], TEXT[30_000:]


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return registry.build(name, SMALL_CONFIGS[name] | overrides)


@pytest.fixture(scope="module")
def hashed():
    """Every byte adapter with all six tables, prepared on the training text, in eval mode."""
    models = {}
    for name in BYTE_ADAPTERS:
        model = build(name, hash_ngrams=NGRAMS, hash_buckets=BUCKETS)
        model.prepare(TRAIN, context())
        models[name] = model.eval()
    return models


# ---- the module ----------------------------------------------------------------------------
def expected_bucket(text: bytes, t: int, n: int, buckets: int) -> int:
    """The hash of bytes t-n+1 .. t of `text`, written out: base-257 digits (byte + 1, 0 where
    the text has no byte yet), most significant first, modulo 2^31 - 1, then modulo buckets."""
    h = 0
    for position in range(t - n + 1, t + 1):
        digit = text[position] + 1 if position >= 0 else 0
        h = (h * 257 + digit) % (2**31 - 1)
    return h % buckets


def test_each_position_gets_the_rows_of_the_ngrams_ending_there():
    torch.manual_seed(0)
    text = b"abc abcd, abc!"  # 'abc' ends at 2, 6 and 12; position 0 and 1 have fewer than 3 bytes
    module = HashNgramEmbedding((3, 5), buckets=BUCKETS, dim=4)
    for table in module:
        nn.init.normal_(table.weight)
    ids = torch.tensor([list(text)])
    out = module(torch.zeros(1, len(text), 4), ids)[0]
    for t in range(len(text)):
        rows = [table.weight[expected_bucket(text, t, n, BUCKETS)] for n, table in zip((3, 5), module)]
        torch.testing.assert_close(out[t], rows[0] + rows[1])
    torch.testing.assert_close(out[2] - module[1].weight[expected_bucket(text, 2, 5, BUCKETS)],
                               out[6] - module[1].weight[expected_bucket(text, 6, 5, BUCKETS)])  # the same 'abc' row
    # a BOS-shifted input (BOS, x_0 .. x_{T-2}) gets at t the n-grams ending at byte t-1
    shifted = module(torch.zeros(1, len(text), 4), F.pad(ids[:, :-1], (1, 0), value=BOS))[0]
    torch.testing.assert_close(shifted[1:], out[:-1])
    nothing = sum(table.weight[0] for table in module)  # BOS alone: every digit 0, bucket 0
    torch.testing.assert_close(shifted[0], nothing)


def test_the_module_declares_its_tables_and_keeps_the_patchers_checkpoint_keys():
    module = HashNgramEmbedding((3, 8), buckets=BUCKETS, dim=16)
    assert (module.ngrams, module.buckets, module.dim, len(module)) == ((3, 8), BUCKETS, 16, 2)
    patcher = build("patcher", hash_ngrams=[3, 8], hash_buckets=BUCKETS)
    state = patcher.state_dict()
    assert {k for k in state if k.startswith("hash_embeds.")} == {"hash_embeds.0.weight", "hash_embeds.1.weight"}
    assert state["hash_embeds.1.weight"].shape == (BUCKETS, SMALL_CONFIGS["patcher"]["d_local"])
    again = build("patcher", seed=1, hash_ngrams=[3, 8], hash_buckets=BUCKETS)
    again.load_state_dict(state)  # strict, as checkpoints load
    assert torch.equal(again.hash_embeds[1].weight, patcher.hash_embeds[1].weight)


@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_every_byte_adapter_validates_the_option_alike(name):
    Config = registry.get(name).Config
    assert Config().hash_ngrams == () and Config().hash_buckets == 4096
    for bad, message in (([2], "greater than or equal to 3"), ([9], "less than or equal to 8"), ([3, 5, 3], "twice")):
        with pytest.raises(ValueError, match=message):
            Config(hash_ngrams=bad)
    with pytest.raises(ValueError):
        Config(hash_ngrams=[3], hash_buckets=0)


# ---- every byte adapter with the tables on -------------------------------------------------
@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_causality_audit_with_tables_on(hashed, name):
    """Every position of a window perturbed in turn: no prediction at or before it moves."""
    window = TEST[:64]
    results = assert_causal(hashed[name], window, positions=list(range(64)))
    assert sum(r.max_change_after > 1e-5 for r in results) >= 60  # the bytes reach later predictions


class PeekingHashBytes(registry.get("bytes")):
    """Deliberately broken: the n-grams at position t end at byte t, the byte it predicts."""

    def next_byte_logits(self, windows):
        inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)
        return self.head(self.body(self.hash_embeds(self.embed(inputs), windows)))


def test_the_audit_catches_ngrams_that_end_at_the_predicted_byte():
    torch.manual_seed(0)
    model = PeekingHashBytes(PeekingHashBytes.Config(**SMALL_CONFIGS["bytes"], hash_ngrams=[3], hash_buckets=BUCKETS))
    results = causality_audit(model, TEST[:64], positions=[5, 30])
    assert all(not r.passed(1e-5) for r in results)


def analytic_forward_flops(model, window: torch.Tensor) -> float:
    """The adapter's FLOP formula for one window (1, W), at the unit count it actually gets."""
    W = window.shape[1]
    if model.name == "patcher":
        return model.forward_flops(W, int(model.patch_starts(window).sum()))["total"]
    if model.name == "spacebyte":
        return model.forward_flops(W, int(model.global_starts(window).sum()))["total"]
    if model.name == "hnet":
        return model.forward_flops(W, int(model.segment(window)[1].sum()))["total"]
    # fixed shapes (byteflow: the top-K variant, what training runs); less what the counter cannot see
    return W * (model.flops_per_byte(W)["total"] - model.uncounted_flops_per_byte(W))


@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_flops_with_tables_on_match_the_counter(hashed, name):
    """Lookups count 0: the formula, which has no term for the tables, is what torch counts."""
    model = hashed[name]
    if name == "byteflow":
        model.set_eval_variant("topk")
    try:
        for window in data.windows(TEST, 64, 3).split(1):
            analytic, counted = analytic_forward_flops(model, window), measure_forward(model, window)
            assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)
    finally:
        model.set_eval_variant(None)


@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_the_tables_are_embedding_parameters(hashed, name):
    model = hashed[name]
    plain = build(name).parameter_counts()
    widths = [model.config.d_embed, model.config.d_local] if name == "megabyte" else \
        [model.config.d_model if name == "bytes" else model.config.d_local]
    tables = len(NGRAMS) * BUCKETS * sum(widths)
    counts = model.parameter_counts()
    assert counts["embedding"] == plain["embedding"] + tables
    assert counts["non_embedding"] == plain["non_embedding"]


@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_the_tables_learn(name):
    model = build(name, hash_ngrams=[3, 5], hash_buckets=BUCKETS).train()
    model.prepare(TRAIN, context())
    model(data.windows(TRAIN, 64, 2)).mean().backward()
    tables = [m for m in model.modules() if isinstance(m, HashNgramEmbedding)]
    assert tables and all(table.weight.grad is not None and table.weight.grad.abs().sum() > 0
                          for module in tables for table in module)


# ---- tables off: nothing changes -----------------------------------------------------------
@pytest.mark.parametrize("name", BYTE_ADAPTERS)
def test_tables_off_add_no_state(name):
    assert not any("hash" in key for key in build(name).state_dict())


def test_tables_off_give_the_bytes_model_as_it_was():
    """The bytes adapter before the option existed was embed -> Transformer -> head, built and
    initialised in that order: same seed, same config, same weights and the same logits."""
    c = registry.get("bytes").Config(**SMALL_CONFIGS["bytes"])
    model = build("bytes")
    torch.manual_seed(0)
    before = nn.ModuleDict({"embed": nn.Embedding(BYTE_VOCAB + 1, c.d_model),
                            "body": Transformer(c.d_model, c.n_layers, c.n_heads, c.mlp_ratio, c.attn_window),
                            "head": nn.Linear(c.d_model, BYTE_VOCAB, bias=False)})
    init_weights(before)
    assert model.state_dict().keys() == before.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.state_dict().items())
    windows = data.windows(TEST, 64, 3)
    inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)
    with torch.no_grad():
        assert torch.equal(model.next_byte_logits(windows), before.head(before.body(before.embed(inputs))))
