"""A token Transformer (baselines/token_lm.py) as a transformers model, for the adapters' export
hook (`harness export RUN_DIR OUT_DIR`). The token Transformer is exactly a Llama:
pre-norm blocks, RMSNorm (eps 1e-6, float32 inside, weight applied after casting
back), RoPE with base 10000 rotating the (first half, second half) pairs of each
head (Llama's rotate_half), SwiGLU as down(silu(gate(x)) * up(x)), no biases,
untied input embedding and head, the head over the whole vocabulary (BOS
included), no embedding scaling. The fused qkv projection is split into
q_proj/k_proj/v_proj (rows [0, C), [C, 2C), [2C, 3C)). A model with a sliding
attention window (window > 0) is exported as Mistral, which is Llama with the
same sliding window (query t sees keys t-w+1..t). Logits match the harness model
to float32 rounding (tests/test_export.py).

Context: the model was trained and evaluated on windows of W bytes (the record's eval
window), which is at most W tokens plus BOS; max_position_embeddings and the tokenizer's
model_max_length say W + 1 (RoPE has no position table, so longer inputs run, untrained).
EOS: the harness scores fixed windows and its BPE vocabulary has BOS only, so eos_token_id
is set only for a vocabulary that has one (`eos_id`), and is null for BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def max_tokens(window_bytes: int) -> int:
    """Positions a window of `window_bytes` bytes can take: BOS plus at most one token per byte."""
    return window_bytes + 1


def hf_config(model, vocab, window_bytes: int):
    """The transformers config of a TokenLM's body, trained on windows of `window_bytes` bytes."""
    from transformers import LlamaConfig, MistralConfig

    c = model.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=model.body.blocks[0].mlp.gate.out_features,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads,
        head_dim=c.d_model // c.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_tokens(window_bytes),
        rms_norm_eps=model.body.norm.eps,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=vocab.bos_id,
        eos_token_id=getattr(vocab, "eos_id", None),  # BPE: none (BOS only)
        pad_token_id=None,
    )
    if c.attn_window:
        return MistralConfig(sliding_window=c.attn_window, **common)
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """harness parameter names -> Llama/Mistral parameter names."""
    C = model.config.d_model
    state = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.body.norm.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, block in enumerate(model.body.blocks):
        prefix = f"model.layers.{i}"
        q, k, v = block.attn.qkv.weight.split(C, dim=0)
        state |= {
            f"{prefix}.input_layernorm.weight": block.attn_norm.weight,
            f"{prefix}.self_attn.q_proj.weight": q,
            f"{prefix}.self_attn.k_proj.weight": k,
            f"{prefix}.self_attn.v_proj.weight": v,
            f"{prefix}.self_attn.o_proj.weight": block.attn.out.weight,
            f"{prefix}.post_attention_layernorm.weight": block.mlp_norm.weight,
            f"{prefix}.mlp.gate_proj.weight": block.mlp.gate.weight,
            f"{prefix}.mlp.up_proj.weight": block.mlp.up.weight,
            f"{prefix}.mlp.down_proj.weight": block.mlp.down.weight,
        }
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in state.items()}


def write_llama(model, tokenizer, out_dir: Path, record: dict) -> str:
    """Write `model` (a TokenLM) with its transformers `tokenizer` to out_dir (float32); returns
    the architecture's name."""
    from transformers import AutoModelForCausalLM

    vocab = model.vocabulary()
    window = int(record["eval"]["window"])
    hf_model = AutoModelForCausalLM.from_config(hf_config(model, vocab, window))
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    missing = [name for name in missing if not name.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    tokenizer.model_max_length = max_tokens(window)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "harness_export.json").write_text(json.dumps({
        "run_id": record["run_id"],
        "suite": record["suite"],
        "adapter": record["model"]["adapter"],
        "config": record["model"]["config"],
        "architecture": type(hf_model).__name__,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": hf_model.config.eos_token_id,
        "trained_window_bytes": window,
        "max_tokens": max_tokens(window),
        "test_bpb": record["test"]["bpb"],
        "note": "score a text as the harness does: BOS + its tokens (the tokenizer adds BOS); each token's NLL "
                "belongs to its bytes. Invalid UTF-8 cannot be passed as text; the harness writes such bytes "
                "as one-byte tokens. Trained on windows of trained_window_bytes bytes (at most max_tokens tokens "
                "with BOS); there is no EOS token unless eos_token_id is set.",
    }, indent=1))
    return type(hf_model).__name__
