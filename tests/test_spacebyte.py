"""SpaceByte (baselines/spacebyte.py): global positions (space rule and cap), FLOPs against
FlopCounterMode, causality audits at, before and after global positions, padding, prefixes,
checkpoints, and a tiny suite through the one trainer and evaluator."""

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from baselines import patching
from harness.analysis.audit import assert_causal, causality_audit
from harness.analysis.segment import segment_bytes
from harness.api import registry
from harness.run.checkpoint import load_checkpoint
from harness.run import data
from harness.run.records import read_suite_records
from harness.orchestrate.runner import run_suite
from harness.run.spec import load_corpus
from harness.orchestrate.suite import load_suite
from harness.modeling.flops import measure_forward
from tests.conftest import context, tiny_suite

CORPUS = data.embedded_corpus("pydoc-topics", 120_000)
TRAIN, TEST = CORPUS[:50_000], CORPUS[100_000:]
WINDOW = 64
TINY = {"d_local": 32, "d_global": 48, "n_heads_local": 2, "n_heads_global": 2, "local_window": 16,
        "calibration_bytes": 16384}
SPACED = b"a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3  # a global position every 2 bytes


def build(**overrides):
    torch.manual_seed(0)
    return registry.build("spacebyte", TINY | overrides)


@pytest.fixture(scope="module")
def prepared():
    model = build()
    model.facts = model.prepare(TRAIN, context(WINDOW)).facts
    return model.eval()


def as_batch(*texts: bytes) -> torch.Tensor:
    return torch.tensor([list(t) for t in texts])


# ---- global positions ------------------------------------------------------------------------
def test_global_positions_are_the_space_rule_up_to_the_cap(prepared):
    text = "Hello, world! a1 bé c".encode()
    text += b"x" * (WINDOW - len(text))
    _, starts = prepared.segment(as_batch(text))
    assert starts[0].nonzero().flatten().tolist() == [0, 6, 13, 17, 19, 21]  # as tests/test_patcher.py spells out
    assert torch.equal(starts, patching.space_starts(as_batch(text)))

    cap = prepared.global_cap(WINDOW)
    assert cap == WINDOW // 6 == 10
    spaced = as_batch(SPACED[:WINDOW])
    rule = patching.space_starts(spaced)
    _, starts = prepared.segment(spaced)
    assert int(rule.sum()) > cap and int(starts.sum()) == cap
    last = int(starts[0].nonzero().max())
    assert torch.equal(starts[0, : last + 1], rule[0, : last + 1]) and not starts[0, last + 1 :].any()

    windows = data.windows(TEST, WINDOW, 32)
    rule, (_, starts) = patching.space_starts(windows), prepared.segment(windows)
    below = rule.sum(1) <= cap
    assert below.any() and (~below).any()
    assert torch.equal(starts[below], rule[below])


def test_the_cap_is_fixed_by_the_context_not_by_the_input_length(prepared):
    spaced = as_batch(SPACED[:WINDOW])
    assert int(prepared.global_starts(spaced[:, :40]).sum()) == prepared.global_cap(WINDOW) == 10  # not 40 // 6
    assert prepared.global_cap(120) == 20  # longer than the context: scaled up
    uncapped = build(cap_patch_size=1)
    assert torch.equal(uncapped.global_starts(spaced), patching.space_starts(spaced))


def test_segment_hook_gives_the_global_positions_of_each_window(prepared):
    text = TEST[:150]
    seg = segment_bytes(prepared, text, WINDOW)
    expected = torch.cat([prepared.global_starts(w[None])[0] for w in data.to_tensor(text).split(WINDOW)])
    assert seg.scores is None and seg.starts.tolist() == expected.tolist() and seg.starts[0] and seg.starts[WINDOW]


def test_preparation_measures_global_positions_on_context_windows(prepared):
    facts = prepared.facts
    assert facts["context_window"] == WINDOW and facts["global_cap"] == 10 and facts["calibration_bytes"] == 16384
    assert 5 < facts["globals_per_window"] <= 10 < facts["rule_starts_per_window"] + 1
    assert 0 < facts["windows_over_cap"] < 1 and 0 < facts["bytes_after_cap"] < 0.2
    assert facts["avg_patch_size"] == pytest.approx(WINDOW / facts["globals_per_window"])
    assert prepared.units_per_byte() == pytest.approx(facts["globals_per_window"] / WINDOW)
    cal = data.windows(TRAIN, WINDOW)
    cal = cal[torch.linspace(0, len(cal) - 1, 16384 // WINDOW).round().long()]
    assert facts["globals_per_window"] == pytest.approx(float(prepared.global_starts(cal).sum(1).double().mean()))


# ---- FLOPs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [WINDOW, 100])  # 100: longer than the context, not a multiple of local_window
def test_flops_match_flop_counter_at_the_batch_global_count(prepared, window):
    windows = data.windows(TEST, window, 4)
    slots = int(prepared.global_starts(windows).sum(1).max())
    counted = measure_forward(prepared, windows)
    analytic = prepared.forward_flops(window, slots)["total"] * len(windows)
    assert analytic == pytest.approx(counted, rel=1e-9), (analytic, counted)
    per_byte = prepared.flops_per_byte(window)
    assert per_byte["total"] == pytest.approx(sum(v for k, v in per_byte.items() if k != "total"))


@pytest.mark.parametrize("window", [WINDOW, 96])
def test_flops_per_byte_is_the_mean_cost_of_the_windows_it_was_measured_on(window):
    """Prepared on exactly these windows, the budget's figure is their mean counted cost, window
    by window (no batch padding): the mean and mean square of G make it exact."""
    model = build().eval()
    windows = data.windows(TEST, window, 12)
    model.prepare(bytes(windows.flatten().tolist()), context(window))
    counted = sum(measure_forward(model, w[None]) for w in windows) / windows.numel()
    assert model.flops_per_byte(window)["total"] == pytest.approx(counted, rel=1e-9)
    counts = model.global_starts(windows).sum(1)
    assert len(set(counts.tolist())) > 1  # the second moment matters here


def test_flops_before_preparation_assume_a_full_cap():
    model = build()
    assert model.units_per_byte() == pytest.approx(1 / 6)  # the cap rate, until measured
    assert model.flops_per_byte(WINDOW)["total"] == pytest.approx(model.forward_flops(WINDOW, 10)["total"] / WINDOW)


# ---- causality ------------------------------------------------------------------------------
def edge_positions(model, window: bytes) -> list[int]:
    """Positions at, just before and just after some global positions of this window."""
    starts = model.global_starts(as_batch(window))[0].nonzero().flatten().tolist()
    chosen = set()
    for s in starts[1:5] + starts[-2:]:
        chosen.update(p for p in (s - 1, s, s + 1) if 0 <= p < len(window))
    return sorted(chosen | {0})


@pytest.mark.parametrize("text", [TEST[:WINDOW], TEST[700:700 + WINDOW], SPACED[:WINDOW]], ids=["prose", "prose2", "capped"])
def test_causality_audit_at_global_positions(prepared, text):
    positions = edge_positions(prepared, text)
    if text == SPACED[:WINDOW]:  # around the cap: the last global position is the 10th start
        positions = sorted(set(positions) | {17, 18, 19, 20, 21, 22})
    assert len(positions) >= 8
    results = assert_causal(prepared, text, positions)
    assert all(r.max_change_after > 1e-5 for r in results if r.position < WINDOW - 1)


class RuleSeesItsOwnByte(registry.get("spacebyte")):
    """Deliberately broken: the rule at t reads byte t (the input is not shifted)."""

    def global_starts(self, windows):
        return patching.space_starts(F.pad(windows[:, 1:], (0, 1), value=ord("x")))


def test_causality_audit_catches_a_rule_that_reads_the_predicted_byte():
    torch.manual_seed(0)
    model = RuleSeesItsOwnByte(RuleSeesItsOwnByte.Config(**TINY))
    text = TEST[:WINDOW]
    positions = [p - 1 for p in patching.space_starts(as_batch(text))[0].nonzero().flatten().tolist()[1:6]]
    results = causality_audit(model, text, positions)
    assert any(not r.passed(1e-5) for r in results)


def test_a_prefix_is_scored_as_inside_the_whole_window(prepared):
    """Byte t scores the same in the full window and as the last byte of bytes 0..t (the cap is
    fixed by the context, not by the input length), on a capped and an uncapped window."""
    windows = torch.cat([data.windows(TEST, WINDOW, 1), as_batch(SPACED[:WINDOW])])
    with torch.no_grad():
        nll = prepared(windows)
        prefixes = torch.stack([prepared(windows[:, : t + 1])[:, -1] for t in range(WINDOW)], dim=1)
    torch.testing.assert_close(nll, prefixes, atol=1e-5, rtol=1e-5)


def test_padding_slots_change_nothing(prepared):
    few = as_batch(b"x" * WINDOW)  # one global position
    many = data.windows(TEST, WINDOW, 1)
    assert int(prepared.global_starts(many).sum()) > 1
    with torch.no_grad():
        alone = prepared(few)
        batched = prepared(torch.cat([few, many]))[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


# ---- model ------------------------------------------------------------------------------------
def test_global_blocks_read_and_write_only_global_positions(prepared):
    """With the global blocks' output projections zeroed, the global stream is the zero-padded byte
    state, and adding its last d_local channels back doubles the state at global positions only."""
    window = data.windows(TEST, WINDOW, 1)
    model = build()
    model.load_state_dict(prepared.state_dict())
    model.eval()
    with torch.no_grad():
        for block in model.global_blocks:
            block.attn.out.weight.zero_()
            block.mlp.down.weight.zero_()
        x = model.embed(F.pad(window[:, :-1], (1, 0), value=256))
        for block in model.initial:
            x = block(x)
        starts = model.global_starts(window)
        expected = x + x * starts[:, :, None]
        logits = model.head(model.final(expected))
        torch.testing.assert_close(model.next_byte_logits(window), logits)


def test_every_parameter_gets_a_gradient(prepared):
    model = build()
    model(data.windows(TEST, WINDOW, 3)).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_checkpoint_restores_the_preparation(prepared, tmp_path):
    torch.save(prepared.state_dict(), tmp_path / "model.pt")
    fresh = build()
    assert fresh.flops_per_byte(WINDOW) != prepared.flops_per_byte(WINDOW)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert fresh.flops_per_byte(WINDOW) == prepared.flops_per_byte(WINDOW)
    assert fresh.units_per_byte() == prepared.units_per_byte()
    windows = data.windows(TEST, WINDOW, 2)
    torch.testing.assert_close(fresh.eval()(windows), prepared(windows))


@pytest.mark.parametrize("bad", [{"d_global": 24}, {"d_global": 50, "n_heads_global": 2}, {"n_heads_local": 3},
                                 {"cap_patch_size": 0.5}, {"final_layers": 0}, {"calibration_bytes": 1}])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        registry.build("spacebyte", TINY | bad)


def test_equal_widths_need_no_padding():
    model = build(d_global=32)
    assert torch.isfinite(model(data.windows(TEST, WINDOW, 2))).all()


# ---- end to end ------------------------------------------------------------------------------
def test_trains_and_evaluates_through_the_runner(write_suite, tmp_path):
    suite = tiny_suite(budgets=[3e9], models=[{"name": "spacebyte", "adapter": "spacebyte", "config": TINY | {"calibration_bytes": 4096}}])
    path = write_suite(suite)
    records = read_suite_records(run_suite(path, tmp_path, "cpu", show_progress=False))
    assert len(records) == 1
    record = records[0]
    assert 0 < record.test.bpb < 8 and math.isfinite(record.val.bpb) and record.steps >= 1
    assert math.isclose(record.bytes_per_unit, record.preparation.facts["avg_patch_size"], rel_tol=1e-9)
    # the runner counts the scored test windows one by one: exactly the formula at their global counts
    model = load_checkpoint(tmp_path / "tiny" / "runs" / record.run_id)
    splits = load_corpus(load_suite(path))
    windows = data.windows(splits.test, WINDOW, 16)
    expected = sum(model.forward_flops(WINDOW, int(model.global_starts(w[None]).sum()))["total"] for w in windows) / windows.numel()
    assert record.flops_per_byte.test == pytest.approx(expected, rel=1e-9)
    assert record.flops_per_byte.analytic == model.flops_per_byte(WINDOW)
    first, last = record.loss_curve[0].train_bpb, record.loss_curve[-1].train_bpb
    assert last < first
    assert record.segmentation.example_starts[0] == 0
