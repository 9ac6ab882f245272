"""Hierarchical patcher (after BLT, Pagnoni et al. 2024, and SpaceByte, Slagle 2024):
bytes are grouped into variable-length patches by a rule (entropy, space-like or
static, see baselines/patching.py), a small local encoder turns the bytes of each
patch into one vector, a large global Transformer runs over the patches, and a small
local decoder predicts every byte from the bytes before it plus the global outputs of
the patches that lie wholly before it.

Causality, position by position (byte t is predicted from bytes < t only):
- patch starts: the start at t depends on bytes < t (patching.py), so patch_id[t]
  (the patch holding byte t) and the extents of patches 0..patch_id[t]-1 do too;
- encoder: causal over the raw bytes, so encoder state t has seen bytes <= t; a
  patch is pooled from the states of its own bytes only (mask), so patch k has seen
  bytes <= end of k; the global model is causal over patches;
- decoder: position t starts from encoder state t-1 (a learned BOS vector at t = 0)
  and reads, by cross-attention, only patches k < patch_id[t], i.e. patches whose
  last byte is < t; its layers are causal over positions.

A window has a variable number of patches; a batch pads them to the largest count.
Padding slots come after every real patch (so causal global attention never reads
them), pool no bytes and are never read by the decoder; nothing is scored but bytes.

The entropy model (a small `bytes` model) is trained in prepare() through the one trainer,
on the training split less its tail, for a declared share of the run's budget
(entropy_budget_share) or a number of steps, and is charged to the run; its bpb on the
held-out tail is recorded next to that tail's order-0 entropy. Against BLT's reference code
(facebookresearch/blt): the same entropy rules and max-pooled patch queries; one hash function
per n-gram size (the reference sums three per size); one query per patch and one
cross-attention after the encoder (the reference has k queries per patch and can cross-attend
in every layer); the decoder reads every patch that ends before the byte, in one
cross-attention before its layers (the reference reads a window of preceding patches).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load as load_tensors, save as save_tensors
from torch import nn

from baselines import patching
from baselines.bytes import ByteTransformer, ByteTransformerConfig
from harness.api import (BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, Preparation, RunContext, SizingFields, cache_dir,
                         read_cache_entry, register, write_json_atomic)
from harness.errors import HarnessError
from harness.modeling import chunking, flops
from harness.modeling.entropy import order0_entropy
from harness.modeling.runtime import autocast
from harness.modeling.nn import CrossAttention, Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding

# The entropy model must beat the order-0 entropy of its held-out bytes by this much (bits per
# byte) before its patches count as informed; otherwise the preparation facts carry a warning.
ENTROPY_MODEL_MARGIN_BPB = 0.25


class PatcherConfig(AdapterConfig, HashNgramConfig):
    patcher: Literal["entropy", "space", "static"] = Field("entropy", description="patch boundary rule")
    d_local: int = Field(64, ge=8, le=MAX_WIDTH, description="width of the local encoder and decoder")
    d_global: int = Field(128, ge=8, le=MAX_WIDTH, description="width of the global model over patches")
    n_heads_local: int = Field(4, ge=1, description="attention heads of local layers and cross-attention")
    n_heads_global: int = Field(4, ge=1, description="attention heads of the global model")
    encoder_layers: int = Field(1, ge=1, description="local encoder blocks (causal, over bytes)")
    global_layers: int = Field(2, ge=1, description="global blocks (causal, over patches)")
    decoder_layers: int = Field(1, ge=1, description="local decoder blocks (causal, over bytes)")
    local_window: int = Field(64, ge=0, description="sliding attention window of local blocks in bytes (0 = full)")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / width")
    pool: Literal["mean", "max"] = Field("max", description="initial patch query: max (BLT's reference code) or mean of its "
                                                           "bytes' encoder states")
    patch_size: int = Field(4, ge=1, description="static: bytes per patch")
    max_patch: int = Field(16, ge=1, description="entropy, space: maximum patch length in bytes")
    entropy_rule: Literal["global", "monotonic"] = Field(
        "global", description="entropy: a patch starts where H_t > theta (global) or H_t - H_{t-1} > theta (monotonic)")
    theta: float | None = Field(None, description="entropy: threshold in nats; None = calibrate to target_patch_size")
    target_patch_size: float = Field(4.5, ge=1, description="entropy: average patch size (bytes) theta is calibrated to; "
                                                            "space, entropy: the assumed size before prepare()")
    entropy_model: ByteTransformerConfig = Field(
        ByteTransformerConfig(d_model=16, n_layers=1, n_heads=2, attn_window=64), description="entropy: the byte LM's config")
    entropy_steps: int = Field(200, ge=1, description="entropy: optimizer steps of the entropy model")
    entropy_flops: float | None = Field(None, gt=0, description="entropy: training FLOPs of the entropy model (overrides entropy_steps)")
    entropy_budget_share: float | None = Field(
        None, gt=0, lt=1, description="entropy: share of the run's training budget spent training the entropy model "
                                      "(overrides entropy_steps; its calibration and held-out scoring are charged on top)")
    entropy_batch_windows: int = Field(2, ge=1, description="entropy: windows per entropy-model step")
    entropy_lr: float = Field(1e-2, gt=0, description="entropy: peak learning rate of the entropy model")
    entropy_holdout_bytes: int = Field(
        16384, ge=1, description="entropy: bytes at the end of the training split that the entropy model does not train "
                                 "on; its bpb is measured there against their order-0 entropy")
    calibration_bytes: int = Field(262144, ge=2, description="bytes of the training split (evenly spaced windows) used to "
                                                             "calibrate theta and measure patch sizes")

    @model_validator(mode="after")
    def _consistent(self):
        if self.patcher == "entropy" and self.theta is None and self.target_patch_size > self.max_patch:
            raise ValueError(f"target_patch_size {self.target_patch_size} exceeds max_patch {self.max_patch}")
        if self.entropy_flops is not None and self.entropy_budget_share is not None:
            raise ValueError("set entropy_flops or entropy_budget_share, not both")
        return self


@register
class Patcher(Adapter):
    name = "patcher"
    description = "hierarchical byte model over patches (BLT/SpaceByte): entropy, space-like or static patch rule"
    Config = PatcherConfig
    sizing = SizingFields(width="d_global", depth="global_layers", heads="n_heads_global",
                          other_widths={"d_local": "n_heads_local"})  # not the entropy model: it stays

    def __init__(self, config: PatcherConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(BYTE_VOCAB, c.d_local)
        # hashed n-grams on the byte embedding of the encoder: the n-gram ends at byte t, as the encoder state t does
        self.hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_local)
        self.encoder = Transformer(c.d_local, c.encoder_layers, c.n_heads_local, c.mlp_ratio, c.local_window)
        self.pool_attn = CrossAttention(c.d_local, c.n_heads_local)  # patch query -> its own bytes
        self.up = nn.Linear(c.d_local, c.d_global, bias=False)
        self.global_model = Transformer(c.d_global, c.global_layers, c.n_heads_global, c.mlp_ratio)
        self.down = nn.Linear(c.d_global, c.d_local, bias=False)
        self.bos = nn.Parameter(torch.zeros(c.d_local))  # decoder input at t = 0 (no byte before it)
        self.read_attn = CrossAttention(c.d_local, c.n_heads_local)  # byte t -> patches ending before t
        self.decoder = Transformer(c.d_local, c.decoder_layers, c.n_heads_local, c.mlp_ratio, c.local_window)
        self.head = nn.Linear(c.d_local, BYTE_VOCAB, bias=False)
        init_weights(self)
        nn.init.normal_(self.bos, std=0.02)
        self.entropy_model = ByteTransformer(c.entropy_model) if c.patcher == "entropy" else None
        if self.entropy_model is not None:
            self.entropy_model.requires_grad_(False)  # trained in prepare(), frozen afterwards
        # learned in prepare() and kept in checkpoints: theta, and how often a patch starts at
        # each position of the run's window (its sum over W positions = patches per window)
        self.register_buffer("theta", torch.tensor(c.theta if c.theta is not None else 0.0))
        self.register_buffer("prepared", torch.tensor(False))
        self.start_rate: list[float] = []  # extra state: empty until prepare()

    # ---- patches -----------------------------------------------------------------------
    @property
    def patch_limit(self) -> int:
        c = self.config
        return c.patch_size if c.patcher == "static" else c.max_patch

    def get_extra_state(self) -> dict:
        return {"start_rate": self.start_rate}

    def set_extra_state(self, state: dict) -> None:
        self.start_rate = [float(r) for r in state["start_rate"]]

    def auxiliary_part(self, windows: torch.Tensor):
        """The entropy model's next-byte entropies (timed by `harness bench`); other rules have none."""
        if self.config.patcher != "entropy":
            return None

        def part() -> None:
            with torch.no_grad(), autocast(windows.device):
                self.entropies(windows)

        return "entropy model (next-byte entropies)", part

    def entropies(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W) next-byte entropy in nats: H[:, t] is computed from bytes < t."""
        return patching.next_byte_entropy(self.entropy_model, windows)

    def starts_from_entropy(self, entropy: torch.Tensor) -> torch.Tensor:
        score = patching.entropy_score(entropy, self.config.entropy_rule)
        return chunking.cap_lengths(score > self.theta, self.patch_limit)

    def patch_starts(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W) bool: byte t begins a patch. Depends on bytes < t only."""
        c = self.config
        B, W = windows.shape
        if c.patcher == "static":
            return chunking.static_starts(B, W, c.patch_size, windows.device)
        if c.patcher == "space":
            return chunking.cap_lengths(patching.space_starts(windows), c.max_patch)
        if not bool(self.prepared):
            raise HarnessError("patcher 'entropy': the entropy model is untrained; run prepare(train_bytes, seed) first")
        return self.starts_from_entropy(self.entropies(windows))

    @torch.no_grad()
    def segment(self, windows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The hook of `harness segment`: (entropy H_t from bytes < t, or None for rules
        without a score; patch starts), both (B, W)."""
        scores = self.entropies(windows) if self.config.patcher == "entropy" else None
        return scores, self.patch_starts(windows)

    def decoder_mask(self, patch_id: torch.Tensor, slots: int) -> torch.Tensor:
        """(B, W, P) bool: byte t may read patch k iff k < patch_id[t], i.e. patch k ends before t."""
        return torch.arange(slots, device=patch_id.device) < patch_id[:, :, None]

    # ---- model -------------------------------------------------------------------------
    def embed_bytes(self, windows: torch.Tensor) -> torch.Tensor:
        """Byte embedding plus hashed n-gram embeddings of the n bytes ending at t (bytes <= t)."""
        return self.hash_embeds(self.embed(windows), windows)

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        B, W = windows.shape
        patch_id = self.patch_starts(windows).long().cumsum(1) - 1  # (B, W) patch holding byte t
        slots = int(patch_id[:, -1].max()) + 1  # P: patches of the most-patched window
        enc = self.encoder(self.embed_bytes(windows))  # (B, W, dl); state t has seen bytes <= t

        # pool: each patch's query starts as the mean (or max) of its bytes, then attends to them
        index = patch_id[:, :, None].expand(-1, -1, enc.shape[-1])
        reduce = "mean" if self.config.pool == "mean" else "amax"
        query = enc.new_zeros(B, slots, enc.shape[-1]).scatter_reduce(1, index, enc, reduce, include_self=False)
        own = patch_id[:, None, :] == torch.arange(slots, device=windows.device)[:, None]  # (B, P, W)
        patches = query + self.pool_attn(query, enc, own[:, None])  # (B, P, dl); padding slots are 0

        glob = self.down(self.global_model(self.up(patches)))  # (B, P, dl), causal over patches

        # decoder position t: encoder state t-1 (bytes < t) plus the patches that end before t
        dec = torch.cat((self.bos.expand(B, 1, -1).to(enc.dtype), enc[:, :-1]), dim=1)  # (B, W, dl)
        dec = dec + self.read_attn(dec, glob, self.decoder_mask(patch_id, slots)[:, None])
        return self.head(self.decoder(dec))  # (B, W, 256)

    # ---- preparation on the training split -----------------------------------------------
    def prepare(self, train_bytes: bytes, ctx: RunContext) -> Preparation:
        """Train the entropy model (entropy rule) and measure it on held-out bytes, calibrate
        theta, and measure how often a patch starts at each position of the run's window, on
        evenly spaced training windows. facts["warnings"] lists what a reader must know (an
        entropy model that does not clearly beat the order-0 entropy)."""
        c = self.config
        cal = chunking.calibration_windows(train_bytes, ctx.window, max(1, c.calibration_bytes // ctx.window))
        facts: dict = {"patcher": c.patcher, "calibration_bytes": cal.numel()}
        warnings: list[str] = []
        auxiliary_flops = 0.0
        if c.patcher == "entropy":
            facts["entropy_model"] = entropy_facts = self._train_entropy_model(train_bytes, ctx)
            if entropy_facts["test_bpb"] > entropy_facts["order0_bpb"] - ENTROPY_MODEL_MARGIN_BPB:
                warnings.append(
                    f"entropy model: {entropy_facts['test_bpb']:.3f} bpb on held-out training bytes, not "
                    f"{ENTROPY_MODEL_MARGIN_BPB} below their order-0 entropy {entropy_facts['order0_bpb']:.3f}: its patch "
                    "boundaries are close to noise (train it longer: entropy_budget_share, entropy_steps)")
            device = next(self.entropy_model.parameters()).device
            entropy = torch.cat([self.entropies(chunk.to(device)).cpu() for chunk in cal.split(64)])
            inference = self.entropy_model.flops_per_byte(ctx.window)["total"] * cal.numel()
            if c.theta is None:
                score = patching.entropy_score(entropy, c.entropy_rule)
                self.theta.fill_(chunking.threshold_for_mean_length(score, c.target_patch_size, c.max_patch))
            starts = self.starts_from_entropy(entropy.to(self.theta.device)).cpu()
            auxiliary_flops = entropy_facts["training_flops"] + entropy_facts["holdout_flops"] + inference
            facts.update({
                "theta": float(self.theta), "theta_calibrated": c.theta is None, "entropy_rule": c.entropy_rule,
                "target_patch_size": c.target_patch_size, "mean_entropy_nats": float(entropy[:, 1:].mean()),
                "calibration_flops": inference,
            })
        else:
            starts = self.patch_starts(cal.to(self.theta.device)).cpu()
        self.start_rate = starts.double().mean(0).tolist()
        self.prepared.fill_(True)
        # how often a patch starts right after a space-like byte, against how often such a byte occurs
        after_space = patching.space_like(cal[:, :-1])
        facts.update({"avg_patch_size": starts.numel() / float(starts.sum()), "patches": int(starts.sum()),
                      "patch_size_limit": self.patch_limit,
                      "starts_after_space_like": float(after_space[starts[:, 1:]].double().mean()),
                      "space_like_rate": float(after_space.double().mean()), "warnings": warnings})
        return Preparation(auxiliary_flops=auxiliary_flops, facts=facts,
                           unit_length_counts=chunking.length_counts(starts, self.patch_limit))

    def carry_preparation(self, prepared: "Patcher") -> None:
        """The entropy model, theta and the measured start rates (none depends on the sized widths)."""
        if self.entropy_model is not None:
            self.entropy_model.load_state_dict(prepared.entropy_model.state_dict())
        for name in ("theta", "prepared"):
            getattr(self, name).copy_(getattr(prepared, name))
        self.start_rate = list(prepared.start_rate)

    def _train_entropy_model(self, train_bytes: bytes, ctx: RunContext) -> dict:
        """Train the entropy model through the one trainer on the training split less its last
        entropy_holdout_bytes, for entropy_steps, entropy_flops, or entropy_budget_share of the
        run's budget; then score those held-out bytes. Its FLOPs are charged to the run."""
        c, model = self.config, self.entropy_model
        if ctx.trainer is None:
            raise HarnessError("patcher: the entropy rule trains an entropy model, which needs the harness's trainer "
                               "(RunContext.trainer)")
        if c.entropy_holdout_bytes < ctx.window:
            raise HarnessError(f"patcher: entropy_holdout_bytes {c.entropy_holdout_bytes} is less than one "
                               f"{ctx.window}-byte window")
        fit, held_out = train_bytes[: -c.entropy_holdout_bytes], train_bytes[-c.entropy_holdout_bytes :]
        fpb = model.flops_per_byte(ctx.window)["total"]
        batch_bytes = c.entropy_batch_windows * ctx.window
        if len(fit) < batch_bytes:
            raise HarnessError(f"patcher: the training split ({len(train_bytes)} bytes) less entropy_holdout_bytes "
                               f"{c.entropy_holdout_bytes} leaves less than one entropy-model batch ({batch_bytes} bytes)")
        steps, budget = c.entropy_steps, c.entropy_flops
        if c.entropy_budget_share is not None:
            if ctx.budget_flops <= 0:
                raise HarnessError("patcher: entropy_budget_share needs the run's budget (RunContext.budget_flops)")
            budget = c.entropy_budget_share * ctx.budget_flops
        if budget is not None:
            steps = flops.training_steps(budget, flops.TRAIN_MULTIPLIER * fpb, batch_bytes)
            if steps < 1:
                raise HarnessError(f"patcher: {budget:.3g} FLOPs for the entropy model is less than one step")
        # like the main model, no more passes over the split than the suite allows; the share it
        # does not spend goes back to the main model (only what it spends is charged)
        epoch_cap = None
        if ctx.max_epochs is not None and steps * batch_bytes > ctx.max_epochs * len(fit):
            epoch_cap = {"max_epochs": ctx.max_epochs, "budget_steps": steps}
            steps = max(1, int(ctx.max_epochs * len(fit) // batch_bytes))
        cache = self._entropy_cache(fit, held_out, steps, ctx)
        cached = read_cache_entry(cache)
        if cached is not None:  # the same training on the same bytes: its weights and facts, charged alike
            model.load_state_dict(load_tensors(base64.b64decode(cached["weights"])))
            model.requires_grad_(False)
            model.eval()
            return cached["facts"] | {"cache_hit": True, "cache_file": str(cache)}
        facts = json.loads(json.dumps(self._fit_entropy_model(fit, held_out, steps, epoch_cap, fpb, ctx)))  # as a hit reads them
        weights = save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        write_json_atomic(cache, {"facts": facts, "weights": base64.b64encode(weights).decode()}, hashed=True)
        return facts | {"cache_hit": False, "cache_file": str(cache)}

    def _entropy_cache(self, fit: bytes, held_out: bytes, steps: int, ctx: RunContext) -> Path:
        """Where the entropy model trained from these bytes with these settings is cached: its key
        is everything the training reads (bench and a rerun of a run then reuse it)."""
        c = self.config
        key = {"format": 1, "torch": torch.__version__, "device": ctx.device.type, "window": ctx.window,
               "seed": ctx.seed, "steps": steps, "config": c.entropy_model.model_dump(), "lr": c.entropy_lr,
               "batch_windows": c.entropy_batch_windows, "fit": hashlib.sha256(fit).hexdigest(),
               "held_out": hashlib.sha256(held_out).hexdigest()}
        return cache_dir("entropy_models") / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"

    def _fit_entropy_model(self, fit: bytes, held_out: bytes, steps: int, epoch_cap: dict | None, fpb: float,
                           ctx: RunContext) -> dict:
        """Train the entropy model for `steps` and score the held-out bytes: the facts prepare() records."""
        c, model = self.config, self.entropy_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # the same entropy model for a seed, however this module was built
            init_weights(model)
        model.requires_grad_(True)
        try:
            result = ctx.trainer.train(model, fit, batch_windows=c.entropy_batch_windows, lr=c.entropy_lr, steps=steps,
                                       description="entropy model")
        finally:
            model.requires_grad_(False)
            model.zero_grad(set_to_none=True)  # frozen from here on: no gradient left behind
            model.eval()
        test_bpb, holdout_bytes = ctx.trainer.bits_per_byte(model, held_out)
        return {
            "config": c.entropy_model.model_dump(), "parameters": model.parameter_counts()["total"], "steps": steps,
            "batch_windows": c.entropy_batch_windows, "lr": c.entropy_lr, "budget_share": c.entropy_budget_share,
            "training_bytes": len(fit), "bytes_seen": result.bytes_seen, "epochs": result.epochs,
            "epoch_cap": epoch_cap,
            "seconds": result.seconds, "final_train_bpb": result.final_train_bpb, "flops_per_byte": fpb,
            "training_flops": flops.TRAIN_MULTIPLIER * fpb * result.bytes_seen,
            # held out: the split's last entropy_holdout_bytes, never trained on
            "holdout_bytes": holdout_bytes, "test_bpb": test_bpb,
            "order0_bpb": order0_entropy(held_out[:holdout_bytes]), "holdout_flops": fpb * holdout_bytes,
        }

    # ---- accounting ------------------------------------------------------------------------
    def expected_patches(self, window: int) -> float:
        """Average patches per window of `window` bytes on the training split: the sum of the
        per-position start rates measured in prepare() (exact up to the run's window, since starts
        are causal; beyond it, the rate of its second half continues). Before prepare(): exact for
        static patches, else one start every target_patch_size bytes."""
        c = self.config
        if c.patcher == "static":
            return float(math.ceil(window / c.patch_size))
        if not self.start_rate:
            return 1.0 + (window - 1) / c.target_patch_size
        rate = torch.tensor(self.start_rate, dtype=torch.float64)
        if window <= len(rate):
            return float(rate[:window].sum())
        return float(rate.sum() + (window - len(rate)) * rate[len(rate) // 2 :].mean())

    def units_per_byte(self) -> float:
        window = len(self.start_rate) or self.config.patch_size
        return self.expected_patches(window) / window

    def forward_flops(self, window: int, patches: float) -> dict[str, float]:
        """Forward FLOPs of one window of `window` bytes processed with `patches` patch slots.
        With the actual padded slot count of a batch this is what the implementation computes
        (the FlopCounterMode check); flops_per_byte uses the training-split average."""
        c, W, P = self.config, window, patches
        dl, dg = c.d_local, c.d_global
        parts = {
            "local_encoder": flops.transformer(W, dl, c.encoder_layers, c.mlp_ratio, c.local_window),
            # masked full products: P x W for pooling, W x P for the decoder's read
            "cross_attention": flops.cross_attention(P, W, dl) + flops.cross_attention(W, P, dl),
            "global": flops.linear(P, dl, dg) + flops.transformer(P, dg, c.global_layers, c.mlp_ratio) + flops.linear(P, dg, dl),
            "local_decoder": flops.transformer(W, dl, c.decoder_layers, c.mlp_ratio, c.local_window) + flops.linear(W, dl, BYTE_VOCAB),
        }
        if self.entropy_model is not None:
            parts["auxiliary"] = self.entropy_model.flops_per_byte(W)["total"] * W  # entropy model inference
        parts["total"] = sum(parts.values())
        return parts

    def flops_per_byte(self, window: int) -> dict[str, float]:
        per_window = self.forward_flops(window, self.expected_patches(window))
        return {name: value / window for name, value in per_window.items()}

    def parameter_counts(self) -> dict[str, int]:
        """The patcher's own parameters; the entropy model's are listed as "auxiliary"."""
        counts = {"total": 0, "embedding": 0}
        for name, module in self.named_children():
            if name == "entropy_model":
                continue
            for m in module.modules():
                for p in m.parameters(recurse=False):
                    counts["total"] += p.numel()
                    counts["embedding"] += p.numel() if isinstance(m, nn.Embedding) else 0
        counts["total"] += self.bos.numel()
        counts["non_embedding"] = counts["total"] - counts["embedding"]
        counts["auxiliary"] = sum(p.numel() for p in self.entropy_model.parameters()) if self.entropy_model is not None else 0
        return counts
