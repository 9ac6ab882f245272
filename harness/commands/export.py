"""`harness export RUN_DIR OUT_DIR`: a trained `bpe` run as a transformers model plus
its tokenizer, loadable with AutoModelForCausalLM / AutoTokenizer from OUT_DIR.

The token Transformer (baselines/token_lm.py on harness.nn) is exactly a Llama:
pre-norm blocks, RMSNorm (eps 1e-6, float32 inside, weight applied after casting
back), RoPE with base 10000 rotating the (first half, second half) pairs of each
head (Llama's rotate_half), SwiGLU as down(silu(gate(x)) * up(x)), no biases,
untied input embedding and head, the head over the whole vocabulary (BOS
included), no embedding scaling. The fused qkv projection is split into
q_proj/k_proj/v_proj (rows [0, C), [C, 2C), [2C, 3C)). A model with a sliding
attention window (window > 0) is exported as Mistral, which is Llama with the
same sliding window (query t sees keys t-w+1..t). Logits match the harness model
to float32 rounding (tests/test_export.py).

The tokenizer is the run's byte-level BPE as a PreTrainedTokenizerFast whose
post-processor prepends BOS, as the harness does for every window. It takes text:
on valid UTF-8 it gives the harness's ids. Two differences, both outside what
text input can express the same way: the harness writes invalid UTF-8 bytes as
one-byte tokens (a str cannot hold them), and the harness tokenizes a literal
`<|bos|>` in the data as text while the exported tokenizer, like any HF
tokenizer, maps it to the special token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError

if TYPE_CHECKING:
    import torch

EXPORTABLE = ("bpe",)


def _hf_config(model, vocab):
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
        max_position_embeddings=8192,
        rms_norm_eps=model.body.norm.eps,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=vocab.bos_id,
        eos_token_id=None,
        pad_token_id=None,
    )
    if c.window:
        return MistralConfig(sliding_window=c.window, **common)
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
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


def _hf_tokenizer(model):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from baselines.bpe import BOS_TOKEN

    tokenizer = model.hf_tokenizer()
    bos = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, clean_up_tokenization_spaces=False)


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's model and tokenizer to out_dir (transformers format, float32)."""
    from transformers import AutoModelForCausalLM

    from harness.core.records import read_record
    from harness.api.registry import load_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    record = read_record(run_dir / "record.json")
    adapter = record["model"]["adapter"]
    if adapter not in EXPORTABLE:
        raise HarnessError(f"{run_dir}: export writes {', '.join(EXPORTABLE)} runs; this run's adapter is {adapter!r}")
    model = load_checkpoint(run_dir, "cpu")
    vocab = model.vocabulary()
    hf_config = _hf_config(model, vocab)
    hf_model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf_model.load_state_dict(_hf_state_dict(model), strict=False)
    missing = [name for name in missing if not name.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    _hf_tokenizer(model).save_pretrained(out_dir)
    (out_dir / "harness_export.json").write_text(json.dumps({
        "run_id": record["run_id"],
        "suite": record["suite"],
        "adapter": adapter,
        "config": record["model"]["config"],
        "architecture": type(hf_model).__name__,
        "bos_token_id": vocab.bos_id,
        "test_bpb": record["test"]["bpb"],
        "note": "score a text as the harness does: BOS + its tokens (the tokenizer adds BOS); each token's NLL "
                "belongs to its bytes. Invalid UTF-8 cannot be passed as text; the harness writes such bytes "
                "as one-byte tokens.",
    }, indent=1))
    return out_dir


def cmd_export(args: argparse.Namespace) -> None:
    out = export_run(args.run_dir, args.out_dir)
    print(f"wrote a transformers model and tokenizer to {out}; load with AutoModelForCausalLM.from_pretrained('{out}')")


def add_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser(
        "export", help="write a trained bpe run as a transformers model + tokenizer",
        description="Write a finished bpe run (RUN_DIR holding record.json and model.pt) to OUT_DIR as a "
                    "transformers LlamaForCausalLM (MistralForCausalLM with a sliding window) and a "
                    "PreTrainedTokenizerFast that prepends BOS; load both with from_pretrained(OUT_DIR).")
    export.add_argument("run_dir", help="e.g. results/smoke/runs/bpe__C2.50e11__s0")
    export.add_argument("out_dir", help="folder to write (created if missing)")
    export.set_defaults(func=cmd_export)
    return export
