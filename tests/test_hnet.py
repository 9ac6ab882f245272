"""The H-Net adapter: FLOPs at the actual chunk counts, causality at and around boundaries, the
ratio loss, the EMA against a slow loop, the trainer charging what each step ran and stopping when
the budget is spent (fixed-rate adapters keep their step counts), and an end-to-end run."""

import math

import pytest
import torch

from baselines.bytes import ByteTransformer, ByteTransformerConfig
from baselines.hnet import P_CLAMP, ratio_loss, smooth, ste_ones
from harness.analysis.audit import assert_causal
from harness.api import TrainingLoss, registry
from harness.run import data
from harness.run.spec import TrainerSettings
from harness.run.train import train
from harness.modeling.flops import TRAIN_MULTIPLIER, measure_forward, training_steps
from harness.run.budget import training_flops_per_byte
from tests.conftest import SMALL_CONFIGS, context, tiny_suite

TINY = SMALL_CONFIGS["hnet"]
TEXT = data.embedded_corpus("pydoc-topics", 12000)


def build(**overrides):
    torch.manual_seed(0)
    return registry.build("hnet", TINY | overrides)


@pytest.fixture(scope="module")
def trained():
    """A tiny H-Net after 40 steps: its routing has moved away from the initial cosine."""
    model = build()
    stream = data.TrainStream(TEXT[:8000], 64, 8, 0)
    train(model, stream, TrainerSettings(batch_windows=8, log_every=10), 40, torch.device("cpu"), show_progress=False)
    return model.eval()


def windows_of(text: bytes, count: int, window: int = 64) -> torch.Tensor:
    return data.to_tensor(text[: count * window]).view(count, window)


# ---- FLOPs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [64, 77])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_flops_match_the_counter_at_each_windows_actual_chunk_count(trained, window, mode):
    model = trained.train(mode == "train")
    windows = windows_of(TEXT[9000:], 3, window)
    counts = model.segment(windows)[1].sum(1).tolist()
    assert len(set(counts)) > 1 or window == 77  # the windows differ in chunk count
    for row, chunks in zip(windows, counts):
        analytic = model.forward_flops(window, chunks)["total"]
        measured = measure_forward(model, row[None])
        assert abs(analytic - measured) <= 0.02 * measured, (chunks, analytic, measured)
    trained.eval()


def test_a_training_batch_reports_the_flops_and_chunks_of_every_window():
    model = build().train()
    windows = windows_of(TEXT, 4)
    out = model.training_loss(windows)
    counts = model.segment(windows)[1].sum(1).tolist()
    assert out.units == sum(counts)
    assert out.forward_flops == pytest.approx(sum(model.forward_flops(64, s)["total"] for s in counts))
    assert out.forward_flops == pytest.approx(sum(measure_forward(model, w[None]) for w in windows), rel=0.02)
    assert set(out.auxiliary) == {"ratio"} and out.nll.shape == (4, 64)


def test_flops_per_byte_uses_the_target_rate_until_the_rate_is_measured(trained):
    model = build(target_ratio=4.0)
    parts = model.flops_per_byte(64)
    assert parts["total"] == pytest.approx(model.forward_flops(64, 16)["total"] / 64)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert model.units_per_byte() == 0.25
    facts = model.finish_training(TEXT, context(64))
    assert model.units_per_byte() == pytest.approx(1 / facts["bytes_per_chunk"])
    assert model.flops_per_byte(64)["total"] == pytest.approx(model.forward_flops(64, 64 * model.units_per_byte())["total"] / 64)


# ---- causality --------------------------------------------------------------------------------

def audit_positions(model, window: bytes) -> list[int]:
    """Every chunk start of this window and the bytes either side, plus the edges."""
    starts = model.segment(torch.tensor([list(window)]))[1][0].nonzero().flatten().tolist()
    around = {p + d for p in starts for d in (-1, 0, 1)}
    return sorted({0, 1, len(window) - 1} | {p for p in around if 0 <= p < len(window)})


@pytest.mark.parametrize("which", ["initial", "trained"])
def test_causality_audit_at_and_around_boundaries(trained, which):
    model = (build() if which == "initial" else trained).eval()
    window = TEXT[9000:9064]
    positions = audit_positions(model, window)
    assert len(positions) >= 12
    assert_causal(model, window, positions)


def test_a_boundary_depends_on_earlier_bytes_only(trained):
    """p_t and b_t come from bytes < t: perturbing byte j moves no decision at or before j, and
    moves some decision after it."""
    original = torch.tensor([list(TEXT[9000:9064])])
    p, b = trained.segment(original)
    moved = False
    for j in range(0, 64, 3):
        perturbed = original.clone()
        perturbed[0, j] = (perturbed[0, j] + 101) % 256
        q, c = trained.segment(perturbed)
        assert torch.equal(p[0, : j + 1], q[0, : j + 1]) and torch.equal(b[0, : j + 1], c[0, : j + 1])
        moved |= bool((b[0, j + 1:] != c[0, j + 1:]).any())
    assert moved


def test_padding_in_a_batch_does_not_change_a_window(trained):
    windows = windows_of(TEXT[9000:], 3)
    assert len(set(trained.segment(windows)[1].sum(1).tolist())) > 1
    with torch.no_grad():
        together = trained.next_byte_logits(windows)
        alone = torch.cat([trained.next_byte_logits(w[None]) for w in windows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ---- the pieces -------------------------------------------------------------------------------

def test_ratio_loss_on_a_hand_example():
    p = torch.tensor([[1.0, 0.2, 0.8, 0.4]])
    b = p >= 0.5  # F = 1/2, G = 0.6
    # N = 3: 3/2 * ((1 - 1/2)(1 - 0.6) + 2 * 1/2 * 0.6) = 3/2 * (0.2 + 0.6) = 1.2
    assert float(ratio_loss(p, b, 3.0)) == pytest.approx(1.2)
    # at the target, F = G = 1/N, the loss is 1, its minimum
    p = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    assert float(ratio_loss(p, p >= 0.5, 3.0)) == pytest.approx(1.0)
    g = torch.tensor(0.5, requires_grad=True)  # with F = 1/2 above the target 1/3, lowering G lowers the loss
    ratio_loss(g.expand(1, 4), torch.tensor([[True, False, True, False]]), 3.0).backward()
    assert g.grad > 0


def slow_ema(z: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(z, dtype=torch.float64)
    previous = torch.zeros(z.shape[0], z.shape[2], dtype=torch.float64)
    for i in range(z.shape[1]):
        previous = P[:, i, None].double() * z[:, i].double() + (1 - P[:, i, None].double()) * previous
        out[:, i] = previous
    return out


@pytest.mark.parametrize("kind", ["random", "extremes", "tiny"])
def test_ema_matches_a_slow_loop(kind):
    torch.manual_seed(1)
    B, S, d = 3, 300, 8
    z = torch.randn(B, S, d) * 5
    P = {"random": torch.rand(B, S),
         "extremes": torch.where(torch.rand(B, S) < 0.5, 0.0, 1.0),
         "tiny": torch.zeros(B, S)}[kind].clamp(P_CLAMP, 1 - P_CLAMP)
    fast = smooth(z, P)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), slow_ema(z, P), atol=1e-4, rtol=1e-4)


def test_ema_gradients_are_finite_at_the_clamp_edges():
    z = torch.randn(2, 50, 4, requires_grad=True)
    logits = torch.full((2, 50), 30.0).masked_fill(torch.rand(2, 50) < 0.5, -30.0).requires_grad_()
    P = torch.sigmoid(logits).clamp(P_CLAMP, 1 - P_CLAMP)
    smooth(z, P).square().sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(logits.grad).all()


def test_straight_through_confidence_is_one_forward_and_passes_its_gradient():
    c = torch.tensor([0.3, 0.7, 0.999], requires_grad=True)
    out = ste_ones(c)
    assert torch.equal(out, torch.ones(3))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(c.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_initialisation_and_gradients_reach_every_stage():
    model = build().train()
    eye = torch.eye(TINY["d_local"])
    assert torch.equal(model.q.weight, eye) and torch.equal(model.k.weight, eye)
    assert model.residual.weight.abs().sum() == 0 and model.pad.abs().sum() == 0
    out = model.training_loss(windows_of(TEXT, 3))
    (out.nll.mean() + sum(out.auxiliary.values())).backward()
    for name in ("embed.weight", "encoder.blocks.0.attn.qkv.weight", "q.weight", "k.weight", "pad",
                 "main.blocks.0.mlp.up.weight", "residual.weight", "decoder.blocks.0.attn.qkv.weight", "head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_routing_follows_the_cosine_at_initialisation():
    model = build()
    windows = windows_of(TEXT, 2)
    h = model.encode(windows)
    p, b = model.route(h)
    cosine = torch.nn.functional.cosine_similarity(h[:, :-1], h[:, 1:], dim=-1)
    torch.testing.assert_close(p[:, 1:], (1 - cosine) / 2, atol=1e-6, rtol=1e-6)
    assert (p[:, 0] == 1).all() and b[:, 0].all() and torch.equal(b, p >= 0.5)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="narrower"):
        registry.build("hnet", {"d_local": 64, "d_main": 32})
    with pytest.raises(ValueError):
        registry.build("hnet", {"target_ratio": 1.0})


# ---- the trainer charges what each step ran -----------------------------------------------------

class Metered(ByteTransformer):
    """A byte model that reports `cost` forward FLOPs per step (not registered)."""

    cost = 1000.0

    def training_loss(self, windows):
        return TrainingLoss(nll=self(windows), forward_flops=self.cost, units=windows.numel() // 4)


def tiny_bytes(cls=ByteTransformer):
    torch.manual_seed(0)
    return cls(ByteTransformerConfig(**SMALL_CONFIGS["bytes"]))


def run_train(model, steps, budget=None):
    stream = data.TrainStream(TEXT[:8000], 64, 4, 0)
    return train(model, stream, TrainerSettings(batch_windows=4, log_every=3), steps, torch.device("cpu"),
                 show_progress=False, budget_flops=budget)


def test_the_trainer_stops_once_the_budget_cannot_pay_for_another_step():
    step = TRAIN_MULTIPLIER * Metered.cost
    result = run_train(tiny_bytes(Metered), steps=20, budget=5.5 * step)
    assert result.steps == 5 and result.stopped_by_budget and result.bytes_seen == 5 * 256
    assert result.flops == 5 * step
    curve = result.curve
    assert [p["step"] for p in curve] == [3, 5]  # the step where the budget ran out is logged
    assert [p["flops"] for p in curve] == [3 * step, 5 * step] and curve[-1]["bytes_per_unit"] == 4.0
    exact = run_train(tiny_bytes(Metered), steps=20, budget=5 * step)  # a budget that pays exactly 5 steps
    assert exact.steps == 5 and exact.flops == 5 * step
    unspent = run_train(tiny_bytes(Metered), steps=4, budget=100 * step)  # the schedule ends first
    assert unspent.steps == 4 and not unspent.stopped_by_budget and unspent.flops == 4 * step


def test_fixed_rate_adapters_run_every_planned_step_whatever_the_budget():
    plain = run_train(tiny_bytes(), steps=7)
    budgeted = run_train(tiny_bytes(), steps=7, budget=1.0)  # far less than one step: ignored
    assert plain.steps == budgeted.steps == 7 and plain.bytes_seen == budgeted.bytes_seen == 7 * 256
    assert plain.curve == budgeted.curve and plain.flops is None and not budgeted.stopped_by_budget
    assert all("flops" not in p and "bytes_per_unit" not in p for p in plain.curve)


def test_hnet_training_charges_each_step_at_its_own_chunk_count():
    model = build()
    per_step = []
    original = model.training_loss

    def spy(windows):
        out = original(windows)
        per_step.append(out.forward_flops)
        return out

    model.training_loss = spy
    result = run_train(model, steps=6)
    assert result.flops == pytest.approx(TRAIN_MULTIPLIER * sum(per_step)) and len(per_step) == 6
    assert len(set(per_step)) > 1  # the chunk count moves from step to step
    assert all(p["bytes_per_unit"] > 1 for p in result.curve)


# ---- end to end -------------------------------------------------------------------------------

def test_runner_end_to_end_charges_actual_flops_and_records_the_rate(write_suite, tmp_path):
    from harness.analysis.segment import segment_bytes
    from harness.run.checkpoint import load_checkpoint
    from harness.run.evaluate import evaluate
    from harness.run.records import read_suite_records
    from harness.orchestrate.runner import run_suite

    budget = 4e9
    models = [{"name": "hnet", "adapter": "hnet", "config": TINY | {"calibration_windows": 32}},
              {"name": "bytes", "adapter": "bytes", "config": SMALL_CONFIGS["bytes"]}]
    out = run_suite(write_suite(tiny_suite(models=models, budgets=[budget])), tmp_path / "results", "cpu",
                    show_progress=False)
    records = {r.model.adapter: r for r in read_suite_records(out)}
    h, b = records["hnet"], records["bytes"]

    # fixed rate: exactly the planned steps, charged at the analytic rate
    per_byte = training_flops_per_byte(b.flops_per_byte.analytic)
    assert b.steps == training_steps(budget, per_byte, b.batch_bytes) and b.bytes_seen == b.steps * b.batch_bytes
    assert b.training_flops == per_byte * b.bytes_seen and b.training_flops_per_byte == per_byte
    assert all(p.flops is None and p.bytes_per_unit is None for p in b.loss_curve)

    # H-Net: what it ran, within the budget (up to the step-to-step variation of the last step's
    # cost, which the stopping rule cannot know), with the rate's trajectory in the curve
    curve = h.loss_curve
    assert h.training_flops == curve[-1].flops <= 1.01 * budget
    # the rate's measurement after training: reserved before it (out of training's share), counted and charged
    assert h.calibration_flops.reserved > 0
    assert h.calibration_flops.spent == pytest.approx(h.calibration_flops.reserved, rel=1e-9)
    assert h.training_flops <= 1.01 * (budget - h.calibration_flops.reserved)
    assert h.total_flops == h.training_flops + h.calibration_flops.spent
    assert h.bytes_seen <= h.steps * h.batch_bytes and h.bytes_seen == curve[-1].bytes
    assert all(p.bytes_per_unit > 1 and "ratio" in p.auxiliary for p in curve)
    assert [p.flops for p in curve] == sorted(p.flops for p in curve)
    assert h.training_flops_per_byte == pytest.approx(h.training_flops / h.bytes_seen)
    if h.bytes_seen < h.steps * h.batch_bytes:
        assert any("budget was spent" in w for w in h.warnings)
    # after training: the measured rate, in the record and in the checkpoint
    assert h.calibration["bytes_per_chunk"] == pytest.approx(h.bytes_per_unit) and h.calibration["target_bytes_per_chunk"] == 6
    assert abs(h.flops_per_byte.training_deviation()) < 0.25 and h.flops_per_byte.test > 0
    model = load_checkpoint(out / "runs" / h.run_id)
    assert model.units_per_byte() == h.units_per_byte
    windows = data.windows(data.embedded_corpus("pydoc-topics", 48192)[44096:], 64, 16)
    assert evaluate(model, windows, 16, torch.device("cpu")).bpb == pytest.approx(h.test.bpb, abs=1e-6)
    assert 0 < h.test.bpb < 9 and h.segmentation is not None and len(h.segmentation.example_scores) > 0
    seg = segment_bytes(model, TEXT[:300], 64)
    assert seg.starts[[0, 64, 128]].all() and math.isclose(seg.scores[0], 1.0)
