"""The causality audit (docs/protocols.md, "2. Causality"), reusable by every adapter's tests.

Perturb byte j of a window and check that every prediction that may not see byte
j is unchanged:
- models that predict one byte at a time (next_byte_logits): the predicted
  distributions of bytes 0..j, all 256 log-probabilities of each;
- tokenizer models: the NLLs of the tokens wholly before the first changed token
  (the adapter's audit_stable_prefix says how many bytes those cover).
The audit also checks that the perturbation changes something after j, so a model
that ignores its input cannot pass by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Adapter


@dataclass
class AuditResult:
    position: int
    stable_prefix: int  # predictions 0..stable_prefix-1 must be unchanged
    max_change_before: float  # largest change among them
    max_change_after: float  # largest change in the predictions after the perturbed byte

    def passed(self, tolerance: float) -> bool:
        return self.max_change_before <= tolerance


def _scores(model: Adapter, windows: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, W, 256) log-probabilities when the model has them, else (B, W, 1) NLLs."""
    if model.byte_level:
        return torch.log_softmax(model.next_byte_logits(windows).double(), dim=-1).cpu(), True
    return model(windows).double().cpu().unsqueeze(-1), False


@torch.no_grad()
def causality_audit(model: Adapter, window: bytes, positions: list[int], seed: int = 0) -> list[AuditResult]:
    """Per perturbed position: how much the predictions that must not move did move. Runs in eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    original = torch.tensor(list(window), dtype=torch.long)
    results = []
    for j in positions:
        perturbed = original.clone()
        perturbed[j] = (perturbed[j] + int(torch.randint(1, 256, (1,), generator=generator))) % 256
        scores, per_byte = _scores(model, torch.stack([original, perturbed]).to(device))
        delta = (scores[0] - scores[1]).abs().amax(dim=-1)  # (W,)
        # a distribution over byte t is fixed before byte t is seen: 0..j must hold
        stable = j + 1 if per_byte else model.audit_stable_prefix(window, bytes(perturbed.tolist()))
        results.append(AuditResult(
            position=j,
            stable_prefix=stable,
            max_change_before=float(delta[:stable].max()) if stable else 0.0,
            max_change_after=float(delta[j + 1:].max()) if j + 1 < len(window) else 0.0,
        ))
    return results


def assert_causal(model: Adapter, window: bytes, positions: list[int], tolerance: float = 1e-5) -> list[AuditResult]:
    """Fail (AssertionError) if any perturbation moves a prediction it may not reach,
    or if no perturbation changed anything at all (a vacuous audit)."""
    results = causality_audit(model, window, positions)
    leaks = [r for r in results if not r.passed(tolerance)]
    assert not leaks, "causality leak: " + "; ".join(
        f"perturbing byte {r.position} moved a prediction before it by {r.max_change_before:.3g}" for r in leaks)
    assert any(r.max_change_after > tolerance for r in results), "the audit is vacuous: no perturbation changed any later prediction"
    return results
