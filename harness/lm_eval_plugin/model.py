"""lm-eval model `harness`: a harness run directory (record.json + model.safetensors) as an lm-eval LM.

All scoring is in bytes (strings become bytes through `text_to_bytes`) and every byte
sequence is scored the way the harness evaluator scores a window: on its own, from an
empty context, by the adapter's forward pass (harness.run.evaluate.window_nll), at most W
bytes long, W being the run's evaluation window (the record's eval window).

- loglikelihood_rolling: the document is cut into consecutive W-byte windows (the last one
  shorter), each scored from an empty context, NLLs summed. A document of exactly W bytes
  is one evaluator window, which is what the task `harness_bpb` uses.
- loglikelihood(context, continuation): every continuation byte is scored, in rolling windows
  of at most W bytes over context + continuation (`scoring_windows`). A request of at most W
  bytes is one window. A longer one is scored in pieces: each window ends at the last byte it
  scores and starts at most W bytes earlier, and scores only bytes that have at least
  C = W // 2 bytes of context inside it (or all of their context, near the start of the text).
  So every continuation byte is predicted from between min(position, C) and W - 1 preceding
  bytes, whatever the continuation's length (windows overlap by C bytes); context further
  back is not seen. Byte-level adapters (Adapter.byte_level) give the sum of the continuation
  bytes' log-probabilities, and is_greedy by argmax under teacher forcing. Adapters that
  score tokens (byte_level False) put a token's NLL on its last byte, so a token may straddle
  a boundary; for them each window's part is taken in bytes: log P(window) - log P(window
  without its scored bytes), each string tokenized on its own. That is exact for any
  byte-causal model and, for tokenizers, the difference of two single-tokenization
  likelihoods (the standard approximation); is_greedy is False.
- generate_until: greedy, one byte at a time, the last W - 1 bytes as context; stops at the
  first stop string or after max_gen_toks bytes. Byte-level adapters only.

Model arguments: pretrained (the run directory), device (default: CUDA when available),
batch_size (windows per forward pass; 'auto' takes max_batch_size or 32), max_batch_size,
eval_variant (one of the adapter's other evaluation rules, e.g. ByteFlow's "topk", scored
as in the record's test_variants).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  (built-ins first: lm-eval imports them itself only while its registry is empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from harness.run import data
from harness.errors import HarnessError
from harness.modeling.runtime import autocast
from harness.run.device import pick_device
from harness.run.evaluate import window_nll
from harness.lm_eval_plugin import bytes_to_text, text_to_bytes
from harness.run.records import read_record
from harness.run.checkpoint import load_checkpoint

MODEL_NAME = "harness"
DEFAULT_BATCH = 32
DEFAULT_GEN_BYTES = 256  # lm-eval's default max_gen_toks, here in bytes
log = logging.getLogger(__name__)


def run_directory(pretrained: str | Path) -> Path:
    """The run directory named by `pretrained` (the directory, or its record.json / model.safetensors / model.pt)."""
    path = Path(pretrained).expanduser()
    if path.is_file() and path.name in ("record.json", "model.safetensors", "model.pt"):
        path = path.parent
    if not (path / "record.json").is_file():
        raise HarnessError(f"pretrained={pretrained}: not a harness run directory (no record.json); "
                           "pass results/SUITE/runs/RUN_ID")
    return path


def scoring_windows(context_bytes: int, total_bytes: int, window: int) -> list[tuple[int, int, int]]:
    """Rolling windows that score bytes context_bytes..total_bytes - 1 of a text, each exactly once:
    (start, end, scored), the window being bytes start..end - 1 and its last `scored` bytes the
    ones it scores. A window is at most `window` bytes; a byte it scores has at least window // 2
    bytes of context inside it, or all the bytes before it when the window starts at 0."""
    keep = window // 2  # the least context a scored byte sees (away from the text's start)
    windows, position = [], context_bytes
    while position < total_bytes:
        end = min(total_bytes, max(window, position + window - keep))
        windows.append((max(0, end - window), end, end - position))
        position = end
    return windows


def batch_windows(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch_size: an integer, or 'auto' / 'auto:N' (no search here: max_batch_size or 32)."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH)
    try:
        size = int(batch_size)
    except ValueError:
        raise HarnessError(f"batch_size={batch_size!r}: expected an integer or 'auto'") from None
    if size < 1:
        raise HarnessError(f"batch_size={batch_size!r}: must be at least 1")
    return size


class HarnessLM(LM):
    """A trained harness adapter behind lm-eval's LM interface (see the module docstring)."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, eval_variant: str | None = None, **kwargs):
        super().__init__()
        if kwargs:
            log.warning("harness model: ignoring arguments %s", ", ".join(sorted(kwargs)))
        self.run_dir = run_directory(pretrained)
        self.record = read_record(self.run_dir / "record.json")
        self._device = pick_device(device, fall_back=True)  # lm-eval's CLI default is cuda:0
        self.model = load_checkpoint(self.run_dir, self._device)
        self.model.set_eval_variant(eval_variant)  # e.g. ByteFlow's "topk" (the record's test_variants)
        self.eval_variant = eval_variant
        self.window = self.record.eval.window
        self.batch_size = batch_windows(batch_size, max_batch_size)
        self.byte_level = self.model.byte_level

    def get_model_info(self) -> dict:
        return {"harness_run": str(self.run_dir), "adapter": self.record.model.adapter,
                "run_id": self.record.run_id, "window": self.window, "byte_level": self.byte_level,
                "eval_variant": self.eval_variant}

    # ---------------------------------------------------------------- scoring helpers

    def _sequence_nll(self, sequences: list[bytes]) -> list[float]:
        """Summed NLL (nats) of each byte sequence (<= W bytes), scored on its own from an empty
        context through the evaluator's own path; sequences of equal length are batched together."""
        totals = [0.0] * len(sequences)
        by_length = defaultdict(list)
        for i, sequence in enumerate(sequences):
            if sequence:
                by_length[len(sequence)].append(i)
        for length, indices in sorted(by_length.items()):
            windows = data.to_tensor(b"".join(sequences[i] for i in indices)).view(len(indices), length)
            for i, nll in zip(indices, window_nll(self.model, windows, self.batch_size, self._device).tolist()):
                totals[i] = nll
        return totals

    @torch.no_grad()
    def _continuation_scores(self, sequences: list[bytes], scored: list[int]) -> list[tuple[float, bool]]:
        """Byte-level adapters: (sum of log P, all greedy) over the last `scored` bytes of each sequence."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
        by_length = defaultdict(list)
        for i, sequence in enumerate(sequences):
            if scored[i] > 0:
                by_length[len(sequence)].append(i)
        self.model.eval()
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), self.batch_size):
                batch_indices = indices[start : start + self.batch_size]
                batch = data.to_tensor(b"".join(sequences[i] for i in batch_indices)).view(-1, length).to(self._device)
                with autocast(self._device):
                    logits = self.model.next_byte_logits(batch)
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, L, 256)
                target = logprobs.gather(-1, batch.unsqueeze(-1)).squeeze(-1).double()  # (B, L)
                greedy = logprobs.argmax(-1) == batch  # (B, L)
                for row, i in enumerate(batch_indices):
                    n = scored[i]
                    results[i] = (float(target[row, length - n :].sum()), bool(greedy[row, length - n :].all()))
        return results

    # ---------------------------------------------------------------- lm-eval's LM interface

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents = []
        for request in requests:
            *leading, text = request.args  # the text is the last argument (0.4: (text,); 0.5: ("", text))
            if any(leading):
                raise HarnessError(f"loglikelihood_rolling request with a non-empty context: {request.args!r:.80}")
            documents.append(text_to_bytes(text))
        pieces, owners = [], []
        for d, document in enumerate(documents):
            for start in range(0, len(document), self.window):
                pieces.append(document[start : start + self.window])
                owners.append(d)
        totals = [0.0] * len(documents)
        for d, nll in zip(owners, self._sequence_nll(pieces)):
            totals[d] -= nll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pieces, contexts, scored, owners = [], [], [], []  # one entry per scoring window
        for r, request in enumerate(requests):
            context, continuation = (text_to_bytes(s) for s in request.args[-2:])
            joint = context + continuation
            for start, end, n in scoring_windows(len(context), len(joint), self.window):
                pieces.append(joint[start:end])
                contexts.append(joint[start : end - n])
                scored.append(n)
                owners.append(r)
        if self.byte_level:
            scores = self._continuation_scores(pieces, scored)
        else:
            nll = self._sequence_nll(pieces + contexts)
            scores = [(nll[len(pieces) + i] - nll[i], False) for i in range(len(pieces))]
        results = [(0.0, True) if self.byte_level else (0.0, False) for _ in requests]
        for r, (logprob, greedy) in zip(owners, scores):
            results[r] = (results[r][0] + logprob, results[r][1] and greedy)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not self.byte_level:
            raise HarnessError(f"adapter {self.record.model.adapter!r} scores tokens, not bytes "
                               "(not byte-level): generate_until needs a byte-level adapter")
        self.model.eval()
        outputs = []
        for request in requests:
            context, options = request.args[-2], dict(request.args[-1] or {})
            if options.get("do_sample"):
                raise HarnessError("the harness model generates greedily only; do_sample=True is not supported")
            until = options.get("until") or []
            stops = [text_to_bytes(s) for s in ([until] if isinstance(until, str) else until) if s]
            generated = self._greedy(text_to_bytes(context), int(options.get("max_gen_toks", DEFAULT_GEN_BYTES)), stops)
            outputs.append(bytes_to_text(generated))
            self.cache_hook.add_partial("generate_until", request.args, outputs[-1])
        return outputs

    def _greedy(self, context: bytes, max_bytes: int, stops: list[bytes]) -> bytes:
        sequence = bytearray(context)
        generated = bytearray()
        for _ in range(max_bytes):
            # the last W - 1 bytes plus a placeholder: position -1 predicts the byte after the context
            window = bytes(sequence[-(self.window - 1) :]) + b"\0"  # W >= 2 (suite schema)
            inputs = data.to_tensor(window).view(1, -1).to(self._device)
            with autocast(self._device):
                logits = self.model.next_byte_logits(inputs)
            byte = int(logits[0, -1].float().argmax())
            sequence.append(byte)
            generated.append(byte)
            ends = [len(generated) - len(stop) for stop in stops if generated.endswith(stop)]
            if ends:
                return bytes(generated[: min(ends)])
        return bytes(generated)


if MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(HarnessLM)
else:  # imported twice (e.g. under another module name): keep the first class, refuse a different model
    existing = model_registry.get(MODEL_NAME)
    if getattr(existing, "__qualname__", None) != HarnessLM.__qualname__:
        raise HarnessError(f"lm-eval model name {MODEL_NAME!r} is taken by {existing!r}")
