"""The ByteFlow adapter: FLOPs, causality (causal rules pass, top-K leaks), shapes,
calibration, an end-to-end run and the segment command."""

import argparse
import math

import pytest
import torch

from harness.run import data

from harness.api import registry
from harness.analysis.audit import assert_causal, causality_audit
from harness.errors import HarnessError
from harness.modeling.flops import measure_forward
from tests.checks import assert_flops_match
from tests.conftest import context, tiny_suite

TINY = {"d_local": 32, "d_global": 32, "n_heads": 2, "global_heads": 2, "attn_window": 8, "score_block": 16,
        "rolling_window": 16, "calibration_windows": 32}
TEXT = data.embedded_corpus("pydoc-topics", 12000)


def build(**overrides):
    torch.manual_seed(0)
    return registry.build("byteflow", TINY | overrides)


def calibrated(**overrides):
    model = build(**overrides)
    model.calibrate(TEXT[:8000], 64)
    return model


@pytest.mark.parametrize("config", [{}, {"score": "logdet"}, {"score": "logdet", "score_block": 0}, {"score": "logdet_normalized"},
                                    {"score": "l2"}, {"score": "l2_streaming"}, {"context": 100},
                                    {"upsample_matrices": 3, "rate": 0.4}, {"upsample_by": "position"}])
@pytest.mark.parametrize("window", [64, 77])
def test_flops_match_flop_counter_under_top_k(config, window):
    model = build(**config)
    model.set_eval_variant("topk")  # static K = round(r T), what training runs and budgets count
    assert_flops_match(model, torch.randint(0, 256, (2, window)))


@pytest.mark.parametrize("rule", ["threshold", "rolling"])
def test_flops_match_flop_counter_under_causal_rules(rule):
    model = calibrated(eval_rule=rule).eval()
    windows = data.to_tensor(TEXT[8000:8128]).view(2, 64)
    starts = model.segment(windows)[1]
    slots = int(starts.sum(1).max())  # the global model runs over the batch's largest chunk count
    analytic = model.forward_flops(64, slots)
    measured = measure_forward(model, windows) / windows.numel() + analytic["scoring_factorisation"]
    assert abs(analytic["total"] - measured) <= 0.02 * measured


def test_flops_breakdown_has_every_stage():
    parts = build().flops_per_byte(128)
    assert {"encoder", "scoring", "scoring_factorisation", "projection", "global", "upsampling", "decoder", "head"} < set(parts)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert build().uncounted_flops_per_byte(128) == parts["scoring_factorisation"] > 0
    assert build(score="l2").uncounted_flops_per_byte(128) == 0
    assert build(score="logdet_recent", context=16).flops_per_byte(128)["scoring_factorisation"] == 16**3 / 3


def audit_positions(model, window: bytes) -> list[int]:
    """Chunk starts of this window (the first and last few) and their neighbours, the edges,
    and every 9th byte (readings that front-load have few late starts)."""
    starts = model.segment(torch.tensor([list(window)]))[1][0].nonzero().flatten().tolist()
    around = {p + d for p in starts[1:4] + starts[-2:] for d in (-1, 0, 1)}
    spread = set(range(0, len(window), 9))
    return sorted({0, 1, len(window) - 1} | spread | {p for p in around if 0 <= p < len(window)})


@pytest.mark.parametrize("score", ["logdet_recent", "logdet", "logdet_normalized", "l2", "l2_streaming"])
@pytest.mark.parametrize("rule", ["threshold", "rolling"])
def test_causality_audit_passes_for_causal_rules(score, rule):
    model = calibrated(score=score, eval_rule=rule).eval()
    assert model.rule() == rule
    window = TEXT[9000:9064]
    positions = audit_positions(model, window)
    assert len(positions) >= 8
    assert_causal(model, window, positions)


@pytest.mark.parametrize("score", ["logdet_recent", "logdet", "l2"])
def test_causality_audit_detects_the_top_k_leak(score):
    model = calibrated(score=score).eval()
    model.set_eval_variant("topk")
    window = TEXT[9000:9064]
    results = causality_audit(model, window, positions=list(range(30, 64, 2)))
    assert any(not r.passed(1e-5) for r in results)  # expected: future bytes move earlier predictions
    model.set_eval_variant(None)  # back to the causal rule: the same window passes
    assert_causal(model, window, positions=list(range(0, 64, 9)))


def test_training_uses_static_top_k_and_gradients_reach_every_stage():
    model = build(rate=0.25).train()
    seen = []
    model.global_model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    nll = model(torch.randint(0, 256, (3, 40)))
    assert nll.shape == (3, 40) and torch.isfinite(nll).all()
    assert seen == [torch.Size([3, 10, 32])]  # K = round(0.25 * 40) chunks in every window
    nll.mean().backward()
    for name in ("embed.weight", "encoder.0.attn.qkv.weight", "down.weight", "up", "head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_upsampling_picks_the_matrix_of_the_offset():
    model = build(upsample_matrices=4)
    g = torch.randn(2, 11, 32)
    offset = torch.randint(0, 9, (2, 11))
    expected = torch.stack([torch.stack([g[b, t] @ model.up[min(int(offset[b, t]), 3)] for t in range(11)]) for b in range(2)])
    torch.testing.assert_close(model.upsample(g, offset), expected)


def test_upsampling_by_position_bins_the_window():
    model = build(upsample_matrices=4, upsample_by="position")
    g = torch.randn(1, 10, 32)
    offset = torch.zeros(1, 10, dtype=torch.long)  # ignored: the bin is floor(t B / T)
    bins = [t * 4 // 10 for t in range(10)]
    expected = torch.stack([g[0, t] @ model.up[bins[t]] for t in range(10)])[None]
    torch.testing.assert_close(model.upsample(g, offset), expected)


def test_default_reading_spreads_chunk_starts_over_the_window_after_training():
    """After a short training on real text, the default (logdet_recent) starts chunks all over
    the window under both rules (mean start within 20% of uniform's (W - 1) / 2), where the
    prefix reading (logdet) piles them into the first part."""
    from harness.run.spec import TrainerSettings
    from harness.run.train import train

    window, means = 128, {}
    for score in ("logdet_recent", "logdet"):
        model = build(score=score, calibration_windows=64)
        stream = data.TrainStream(TEXT, window, 8, seed=0)
        train(model, stream, TrainerSettings(batch_windows=8, lr=3e-3), 30, torch.device("cpu"), show_progress=False)
        means[score] = model.calibrate(TEXT, window)["mean_start_position"]
    uniform = (window - 1) / 2
    for rule in ("threshold", "topk"):
        assert abs(means["logdet_recent"][rule] - uniform) < 0.2 * uniform, means
        assert means["logdet"][rule] < 0.7 * uniform, means


def test_padding_in_evaluation_does_not_change_a_window():
    model = calibrated().eval()
    windows = data.to_tensor(TEXT[8000:8192]).view(3, 64)
    starts = model.segment(windows)[1].sum(1)
    assert len(set(starts.tolist())) > 1  # windows differ in chunk count, so the shorter ones are padded
    with torch.no_grad():
        together = model.next_byte_logits(windows)
        alone = torch.cat([model.next_byte_logits(w[None]) for w in windows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_calibration_records_the_selection_rate():
    model = build()
    assert math.isnan(float(model.threshold)) and model.eval().rule() == "rolling"  # uncalibrated: causal fallback
    facts = model.calibrate(TEXT[:8000], 64)
    assert facts["target_rate"] == 16 / 64
    assert abs(facts["selection_rate"]["threshold"] - 0.25) < 0.01 and facts["selection_rate"]["topk"] == 0.25
    for rule in ("threshold", "rolling", "topk"):
        assert sum(facts["start_position_eighths"][rule]) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= facts["bytes_in_chunks_of_at_least_B"][rule] <= 1 and facts["longest_chunk"][rule] >= 1
    assert model.eval().rule() == "threshold" and facts["threshold"] == float(model.threshold)
    state = build().state_dict()
    assert math.isnan(float(state["threshold"]))
    restored = build()
    restored.load_state_dict(model.state_dict())
    assert float(restored.threshold) == facts["threshold"]


def test_finish_training_calibrates_on_the_run_window_and_times_nothing():
    model = build().train()
    facts = model.finish_training(TEXT, context(64))
    assert facts["calibration_windows"] == 32
    assert "scoring_share_of_step" not in facts  # a timing of training steps: `harness bench` measures it, unbudgeted
    assert model.training  # mode restored


def test_eval_variants():
    model = build()
    assert model.eval_variants() == {"topk": "global top-K selection (non-causal, not a valid likelihood)"}
    model.set_eval_variant("topk")
    assert model.eval().rule() == "topk"
    model.set_eval_variant(None)
    with pytest.raises(HarnessError, match="no evaluation variant"):
        model.set_eval_variant("bogus")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        registry.build("byteflow", {"rate": 0})
    with pytest.raises(ValueError):
        registry.build("byteflow", {"score": "entropy"})
    with pytest.raises(ValueError):
        registry.build("byteflow", {"context": 0})


def segment_cli(argv):
    from harness.commands import segment

    top = argparse.ArgumentParser(prog="harness")
    segment.add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["segment", *argv])
    args.func(args)


def test_runner_end_to_end_with_both_rules_and_the_segment_command(write_suite, tmp_path, capsys):
    from harness.run.evaluate import evaluate
    from harness.run.records import read_suite_records
    from harness.run.checkpoint import load_checkpoint
    from harness.orchestrate.runner import run_suite
    from harness.analysis.segment import segment_bytes

    config = TINY | {"calibration_windows": 16}
    suite = tiny_suite(models=[{"name": "bf", "adapter": "byteflow", "config": config}])
    out = run_suite(write_suite(suite), tmp_path / "results", "cpu", show_progress=False)
    (r,) = read_suite_records(out)
    topk = r.test_variants["topk"]
    assert "not a valid likelihood" in topk.label and 0 < topk.bpb < 9
    assert 0 < r.test.bpb < 9 and topk.bytes == r.test.bytes and r.test.bpb != topk.bpb
    assert 0 < r.calibration_flops.spent == pytest.approx(r.calibration_flops.reserved, rel=1e-6)
    assert abs(r.calibration["selection_rate"]["threshold"] - 0.25) < 0.02
    assert r.bytes_per_unit == 4.0  # a chunk per 4 bytes (rate 0.25), for the report's bytes per unit
    # the checkpoint keeps the calibrated threshold: the same test score after reloading
    run_dir = out / "runs" / r.run_id
    model = load_checkpoint(run_dir)
    assert float(model.threshold) == r.calibration["threshold"]
    windows = data.windows(data.embedded_corpus("pydoc-topics", 48192)[44096:], 64, 16)
    assert evaluate(model, windows, 16, torch.device("cpu")).bpb == pytest.approx(r.test.bpb, abs=1e-6)

    capsys.readouterr()
    picture = tmp_path / "pics" / "seg.png"
    segment_cli([str(run_dir), "--text", "Hello, world. This is a test of the segment command!", "-o", str(picture)])
    printed = capsys.readouterr().out
    assert "|" in printed and "chunks, mean" in printed
    assert picture.stat().st_size > 1000 and (tmp_path / "pics" / "seg_chunk_lengths.png").stat().st_size > 1000
    segment_cli([str(run_dir), "--split", "test", "--max-bytes", "100", "--variant", "topk"])
    assert (run_dir / "segment_test_0-100_topk.png").is_file()  # named after what was segmented
    assert segment_bytes(registry.build("bytes", {"d_model": 16, "n_layers": 1, "n_heads": 2}), b"abc", 64) is None


def test_segmentation_marks_chunk_starts():
    from harness.analysis.segment import marked_text, segment_bytes

    model = calibrated().eval()
    text = TEXT[9000:9150]
    seg = segment_bytes(model, text, 64)
    assert len(seg.scores) == len(seg.starts) == 150
    assert seg.starts[[0, 64, 128]].all()  # every window starts a chunk
    assert b"".join(seg.chunks()) == text and seg.lengths().sum() == 150
    assert marked_text(seg).replace("|", "") == text.decode().replace("|", "")
    windows = torch.tensor([list(text[:64])])
    assert seg.starts[:64].tolist() == model.segment(windows)[1][0].tolist()
