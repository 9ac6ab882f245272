"""The hierarchical patcher (baselines/patcher.py) and its boundary rules (baselines/patching.py):
rules, calibration, FLOPs against FlopCounterMode, causality audits at patch edges, padding,
checkpoints, a tiny suite through the one trainer and evaluator, and the patch plots."""

import copy
import math

import pytest
import torch

from baselines import patching
from baselines.patcher import ENTROPY_MODEL_MARGIN_BPB
from harness.run import data
from harness.api import registry
from harness.analysis.audit import assert_causal, causality_audit
from harness.errors import HarnessError
from harness.modeling.flops import measure_forward
from harness.analysis.report import plot_patch_sizes
from harness.analysis.segment import plot_segmentation, segment_bytes
from harness.run.records import read_suite_records
from harness.orchestrate.runner import run_suite
from tests.checks import assert_flops_match
from harness.modeling import chunking
from tests.conftest import context, tiny_suite

CORPUS = data.embedded_corpus("pydoc-topics", 120_000)
TRAIN, TEST = CORPUS[:50_000], CORPUS[100_000:]
WINDOW = 64
TINY = {
    "d_local": 32, "d_global": 48, "n_heads_local": 2, "n_heads_global": 2, "local_window": 16,
    "calibration_bytes": 16384, "entropy_steps": 15, "entropy_batch_windows": 8,
    "entropy_model": {"d_model": 16, "n_layers": 1, "n_heads": 2},
}


def build(**overrides):
    return registry.build("patcher", TINY | overrides)


@pytest.fixture(scope="module")
def prepared():
    """One prepared model per patcher (the entropy model trained once for the module)."""
    models = {}
    for patcher in ("static", "space", "entropy"):
        torch.manual_seed(0)
        model = build(patcher=patcher)
        model.facts = model.prepare(TRAIN, context(WINDOW))
        models[patcher] = model.eval()
    return models


def text_windows(n: int, window: int = WINDOW) -> torch.Tensor:
    return data.windows(TEST, window, n)


# ---- boundary rules ----------------------------------------------------------------------
def test_space_rule_starts_after_a_space_like_byte_not_after_another():
    text = "Hello, world! a1 bé c".encode()
    starts = patching.space_starts(torch.tensor([list(text)]))[0]
    # ',' (5) starts a patch at 6; ' ' (6) follows ',' so 7 is no start; '!' (12) -> 13; ' ' (16) -> 17;
    # 0xC3 (18, a UTF-8 lead byte, space-like) -> 19; 0xA9 (19) is a continuation byte, not space-like;
    # ' ' (20) -> 21
    assert starts.nonzero().flatten().tolist() == [0, 6, 13, 17, 19, 21]


def test_cap_patch_length_splits_long_patches_only():
    natural = torch.zeros(1, 20, dtype=torch.bool)
    natural[0, [0, 10, 11]] = True
    capped = chunking.cap_lengths(natural, 4)
    assert capped[0].nonzero().flatten().tolist() == [0, 4, 8, 10, 11, 15, 19]
    lengths = chunking.unit_lengths(capped)
    assert lengths.tolist() == [4, 4, 2, 1, 4, 4, 1] and int(lengths.max()) <= 4


def test_entropy_rules_global_and_monotonic():
    entropy = torch.tensor([[3.0, 1.0, 2.5, 2.6, 0.5, 2.0]])
    glob = patching.entropy_score(entropy, "global") > 2.0
    assert glob[0].nonzero().flatten().tolist() == [0, 2, 3]
    mono = patching.entropy_score(entropy, "monotonic") > 1.0
    assert mono[0].nonzero().flatten().tolist() == [0, 2, 5]  # rises 1.5 at 2 and 1.5 at 5


def test_calibration_picks_the_threshold_closest_to_the_target():
    torch.manual_seed(1)
    score = patching.entropy_score(torch.rand(32, 100) * 4, "global")
    theta = chunking.threshold_for_mean_length(score, 4.5, 16)
    starts = chunking.cap_lengths(score > theta, 16)
    average = starts.numel() / float(starts.sum())
    assert abs(average - 4.5) < 0.05


# ---- preparation and calibration -------------------------------------------------------------
def test_calibration_is_deterministic_for_a_seed_and_recorded(prepared):
    facts = prepared["entropy"].facts
    torch.manual_seed(123)  # a different construction RNG: prepare re-seeds the entropy model
    again = build(patcher="entropy")
    facts_again = again.prepare(TRAIN, context(WINDOW))
    for key in ("theta", "avg_patch_size"):
        assert facts_again.facts[key] == facts.facts[key], key
    assert (facts_again.unit_length_counts, facts_again.auxiliary_flops) == (facts.unit_length_counts, facts.auxiliary_flops)
    assert again.start_rate == prepared["entropy"].start_rate
    assert abs(facts.facts["avg_patch_size"] - 4.5) < 0.3
    assert sum(facts.unit_length_counts) == facts.facts["patches"] and len(facts.unit_length_counts) == 16
    assert facts.auxiliary_flops > facts.facts["entropy_model"]["training_flops"] > 0
    assert math.isclose(float(prepared["entropy"].theta), facts.facts["theta"])


def test_entropy_model_beats_order0_within_its_budget_share():
    """Trained for a tenth of a 1e10-FLOP run on 42 kB, the entropy model scores the 8 kB it
    never saw clearly below their order-0 entropy, and the preparation says so."""
    torch.manual_seed(0)
    model = build(patcher="entropy", entropy_budget_share=0.1, entropy_batch_windows=2, entropy_holdout_bytes=8192)
    prep = model.prepare(TRAIN, context(WINDOW, budget_flops=1e10))
    facts = prep.facts["entropy_model"]
    assert facts["training_flops"] <= 0.1 * 1e10 and facts["budget_share"] == 0.1
    assert facts["training_bytes"] == len(TRAIN) - 8192 and facts["holdout_bytes"] == 8192
    assert facts["test_bpb"] < facts["order0_bpb"] - ENTROPY_MODEL_MARGIN_BPB, facts
    assert prep.facts["warnings"] == []
    assert prep.auxiliary_flops > facts["training_flops"] + facts["holdout_flops"] > facts["training_flops"]
    # informed patches start after a space-like byte far more often than such bytes occur
    assert prep.facts["starts_after_space_like"] > 1.5 * prep.facts["space_like_rate"]


def test_the_entropy_model_keeps_the_suites_epoch_cap():
    """Asked for more passes over the split than max_epochs allows, the entropy model stops at
    the cap, says so, and is charged only what it trained."""
    model = build(patcher="entropy", entropy_steps=1000, entropy_batch_windows=2, entropy_holdout_bytes=8192)
    facts = model.prepare(TRAIN, context(WINDOW, max_epochs=0.05)).facts["entropy_model"]
    fit = len(TRAIN) - 8192
    assert facts["epoch_cap"] == {"max_epochs": 0.05, "budget_steps": 1000}
    assert facts["steps"] == int(0.05 * fit // (2 * WINDOW)) and facts["epochs"] <= 0.05
    assert facts["training_flops"] == 3 * facts["flops_per_byte"] * facts["steps"] * 2 * WINDOW
    uncapped = build(patcher="entropy", entropy_steps=3, entropy_batch_windows=2, entropy_holdout_bytes=8192)
    assert uncapped.prepare(TRAIN, context(WINDOW, max_epochs=0.05)).facts["entropy_model"]["epoch_cap"] is None


def test_an_undertrained_entropy_model_is_flagged():
    model = build(patcher="entropy", entropy_steps=2)
    facts = model.prepare(TRAIN, context(WINDOW)).facts
    assert len(facts["warnings"]) == 1 and "order-0" in facts["warnings"][0]
    assert facts["entropy_model"]["test_bpb"] > facts["entropy_model"]["order0_bpb"] - ENTROPY_MODEL_MARGIN_BPB


def test_entropy_budget_share_needs_the_run_budget():
    with pytest.raises(HarnessError, match="budget"):
        build(patcher="entropy", entropy_budget_share=0.1).prepare(TRAIN, context(WINDOW))
    with pytest.raises(ValueError, match="not both"):
        registry.get("patcher").Config(entropy_flops=1e9, entropy_budget_share=0.1)
    with pytest.raises(HarnessError, match="holdout"):
        build(patcher="entropy", entropy_holdout_bytes=WINDOW - 1).prepare(TRAIN, context(WINDOW))
    with pytest.raises(HarnessError, match="less than one entropy-model batch"):
        build(patcher="entropy", entropy_holdout_bytes=len(TRAIN) - 100).prepare(TRAIN, context(WINDOW))


def test_given_theta_is_used_and_monotonic_rule_calibrates():
    model = build(patcher="entropy", theta=4.0, entropy_steps=2)
    facts = model.prepare(TRAIN, context(WINDOW)).facts
    assert facts["theta"] == 4.0 and not facts["theta_calibrated"]
    mono = build(patcher="entropy", entropy_rule="monotonic", entropy_steps=2, target_patch_size=3.0)
    facts = mono.prepare(TRAIN, context(WINDOW)).facts
    assert facts["entropy_rule"] == "monotonic" and abs(facts["avg_patch_size"] - 3.0) < 0.3


def test_static_and_space_statistics(prepared):
    assert prepared["static"].facts.facts["avg_patch_size"] == 4.0
    assert prepared["static"].facts.unit_length_counts == [0, 0, 0, 4096]
    space = prepared["space"].facts
    assert 3 < space.facts["avg_patch_size"] < 10 and space.unit_length_counts[-1] > 0  # some hit max_patch


def test_untrained_entropy_patcher_refuses_to_run():
    with pytest.raises(HarnessError, match="prepare"):
        build(patcher="entropy")(text_windows(1))


# ---- FLOPs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("patcher", ["static", "space", "entropy"])
def test_flops_match_flop_counter_on_a_real_batch(prepared, patcher):
    """The counter sees the batch's padded patch slots: compare it with the analytic formula at
    those shapes; the budget formula is the same formula at the training-split average."""
    model = prepared[patcher]
    windows = text_windows(4)
    slots = int(model.patch_starts(windows).sum(1).max())
    analytic = model.forward_flops(WINDOW, slots)["total"] * len(windows)
    counted = measure_forward(model, windows)
    assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)
    per_byte = model.flops_per_byte(WINDOW)
    average = model.facts.facts["avg_patch_size"]
    assert math.isclose(model.expected_patches(WINDOW), WINDOW / average, rel_tol=1e-6)
    assert math.isclose(per_byte["total"], model.forward_flops(WINDOW, WINDOW / average)["total"] / WINDOW)
    assert math.isclose(per_byte["total"], sum(v for k, v in per_byte.items() if k != "total"))
    assert ("auxiliary" in per_byte) == (patcher == "entropy")


def test_static_patches_need_no_padding_so_the_budget_formula_is_counted_exactly(prepared):
    analytic, counted = assert_flops_match(prepared["static"], text_windows(3))
    assert analytic == counted


def test_flops_with_hash_ngrams_and_max_pool():
    model = build(patcher="space", hash_ngrams=[3, 5], pool="max").eval()
    windows = text_windows(2, 80)
    slots = int(model.patch_starts(windows).sum(1).max())
    counted = measure_forward(model, windows)
    assert abs(model.forward_flops(80, slots)["total"] * 2 - counted) <= 0.02 * counted


# ---- causality ------------------------------------------------------------------------------
def edge_positions(model, window: bytes) -> list[int]:
    """Positions at, just before and just after some patch starts of this window."""
    starts = model.patch_starts(torch.tensor([list(window)]))[0].nonzero().flatten().tolist()
    chosen = set()
    for s in starts[1:5] + starts[-2:]:
        chosen.update(p for p in (s - 1, s, s + 1) if 0 <= p < len(window))
    return sorted(chosen | {0})


@pytest.mark.parametrize("patcher", ["static", "space", "entropy"])
def test_causality_audit_at_patch_edges(prepared, patcher):
    model = prepared[patcher]
    window = TEST[:WINDOW]
    positions = edge_positions(model, window)
    assert len(positions) >= 8
    assert_causal(model, window, positions)


@pytest.mark.parametrize("overrides", [
    {"patcher": "space", "hash_ngrams": [3, 8], "pool": "max"},
    {"patcher": "entropy", "entropy_rule": "monotonic", "entropy_steps": 3},
])
def test_causality_audit_variants(overrides):
    torch.manual_seed(0)
    model = build(**overrides)
    model.prepare(TRAIN, context(WINDOW))
    window = TEST[200:200 + WINDOW]
    assert_causal(model, window, edge_positions(model.eval(), window))


class PeekingPatcher(registry.get("patcher")):
    """Deliberately broken: byte t also reads the patch that holds it."""

    def decoder_mask(self, patch_id, slots):
        return torch.arange(slots) <= patch_id[:, :, None]


def test_causality_audit_catches_reading_the_current_patch():
    torch.manual_seed(0)
    model = PeekingPatcher(PeekingPatcher.Config(**TINY, patcher="static"))
    results = causality_audit(model, TEST[:WINDOW], positions=[5, 9, 30])
    assert any(not r.passed(1e-5) for r in results)


def test_a_byte_reads_exactly_the_patches_that_end_before_it(prepared):
    model = prepared["space"]
    windows = text_windows(3)
    patch_id = model.patch_starts(windows).long().cumsum(1) - 1
    slots = int(patch_id.max()) + 1
    mask = model.decoder_mask(patch_id, slots)  # (B, W, P)
    position = torch.arange(WINDOW)
    for b in range(len(windows)):
        for k in range(int(patch_id[b].max()) + 1):
            end = int(position[patch_id[b] == k].max())
            assert torch.equal(mask[b, :, k], position > end)
        assert not mask[b, :, int(patch_id[b].max()) + 1:].any()  # padding slots are never read


# ---- padding and checkpoints -------------------------------------------------------------------
def test_padding_slots_change_nothing(prepared):
    """A window's scores are the same alone as in a batch with a window of more patches."""
    model = prepared["space"]
    few = torch.tensor([list(b"x" * WINDOW)])  # one patch per max_patch bytes
    many = text_windows(1)
    assert int(model.patch_starts(many).sum()) > int(model.patch_starts(few).sum())
    alone = model(few)
    batched = model(torch.cat([few, many]))[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_checkpoint_restores_entropy_model_and_theta(prepared, tmp_path):
    model = prepared["entropy"]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = build(patcher="entropy")
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    windows = text_windows(2)
    assert float(fresh.theta) == float(model.theta)
    assert torch.equal(fresh.patch_starts(windows), model.patch_starts(windows))
    assert torch.allclose(fresh(windows), model(windows))
    assert fresh.flops_per_byte(WINDOW) == model.flops_per_byte(WINDOW)


def test_gradients_reach_the_model_but_not_the_entropy_model(prepared):
    model = copy.deepcopy(prepared["entropy"]).train()
    model(text_windows(2)).mean().backward()
    assert model.global_model.blocks[0].attn.qkv.weight.grad is not None
    assert model.pool_attn.q.weight.grad is not None and model.embed.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.entropy_model.parameters())
    counts = model.parameter_counts()
    assert counts["auxiliary"] == sum(p.numel() for p in model.entropy_model.parameters()) > 0


def test_config_errors():
    with pytest.raises(ValueError, match="max_patch"):
        registry.get("patcher").Config(target_patch_size=20, max_patch=8)
    with pytest.raises(ValueError):
        registry.get("patcher").Config(hash_ngrams=[2])


# ---- end to end, and the plots -------------------------------------------------------------------
def test_three_patchers_train_and_evaluate_through_the_runner(write_suite, tmp_path, prepared):
    config = TINY | {"calibration_bytes": 4096, "entropy_steps": 6}
    suite = tiny_suite(budgets=[3e9], models=[
        {"name": f"patch-{p}", "adapter": "patcher", "config": config | {"patcher": p}} for p in ("entropy", "space", "static")
    ])
    records = {r.model.name: r for r in read_suite_records(run_suite(write_suite(suite), tmp_path, "cpu", show_progress=False))}
    assert len(records) == 3
    entropy = records["patch-entropy"]
    assert entropy.auxiliary_training_flops == entropy.preparation.auxiliary_flops > 0
    assert entropy.flops_per_byte.analytic["auxiliary"] > 0 and "theta" in entropy.preparation.facts
    for r in records.values():
        assert 0 < r.test.bpb < 9 and r.steps >= 1
        assert math.isclose(r.bytes_per_unit, r.preparation.facts["avg_patch_size"], rel_tol=1e-6)
        assert r.parameters["total"] > 0

    assert plot_patch_sizes(list(records.values()), tmp_path / "sizes.png")
    assert (tmp_path / "sizes.png").stat().st_size > 1000
    bare = records["patch-static"].model_copy(update={"preparation": records["patch-static"].preparation.model_copy(
        update={"unit_length_counts": None})})
    assert not plot_patch_sizes([bare], tmp_path / "none.png")
    text = TEST[:150]
    for patcher, model in prepared.items():  # the segment hook: boundaries as the model patches
        seg = segment_bytes(model, text, WINDOW)
        expected = torch.cat([model.patch_starts(w[None])[0] for w in data.to_tensor(text).split(WINDOW)])
        assert seg.starts.tolist() == expected.tolist() and seg.starts[0] and seg.starts[WINDOW]
        assert (seg.scores is not None) == (patcher == "entropy")
        plot_segmentation(seg, tmp_path / f"{patcher}.png", patcher)
        assert (tmp_path / f"{patcher}.png").stat().st_size > 1000
