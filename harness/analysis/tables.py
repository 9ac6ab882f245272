"""Report tables as markdown, each column in its own number format."""

from __future__ import annotations

import pandas as pd


def markdown(frame: pd.DataFrame) -> str:
    formats = {
        "params": "{:,.0f}", "fwd FLOPs/byte": "{:.3g}", "train FLOPs": "{:.3g}", "bytes seen": "{:,.0f}",
        "epochs": "{:.2f}", "val bpb": "{:.4f}", "test bpb": "{:.4f}", "bytes/unit": "{:.2f}", "wall s": "{:.1f}",
        "FLOP/s": "{:.3g}", "MFU": "{:.1%}", "bpb": "{:.4f}", "budget": "{:.3g}", "Δ vs best": "{:+.4f}", "causal test bpb": "{:.4f}", "causal - rule": "{:+.4f}", "p": "{:.3g}",
        "bytes/token (test)": "{:.3f}", "bytes/token (test windows)": "{:.3f}", "vocab used (test)": "{:.1%}",
        "tokenizer train s": "{:.2f}", "encode MB/s": "{:.2f}",
        "configured FLOPs/byte": "{:.4g}", "target FLOPs/byte": "{:.4g}", "achieved FLOPs/byte": "{:.4g}", "error": "{:+.2%}",
        "test fwd FLOPs/byte": "{:.3g}", "analytic FLOPs/byte": "{:.4g}", "test FLOPs/byte": "{:.4g}", "counted training FLOPs/byte": "{:.4g}",
        "test vs analytic": "{:+.1%}", "training vs analytic": "{:+.1%}",
        "last finite loss": "{:.4g}",
        "embedding params": "{:,.0f}", "non-embedding params": "{:,.0f}", "base bpb": "{:.4f}", "level bpb": "{:.4f}",
        "Δ bpb": "{:+.4f}",
        "clean bpb": "{:.4f}", "noised bpb": "{:.4f}", "continuation, clean context": "{:.4f}",
        "continuation, noised context": "{:.4f}", "conditional Δ": "{:+.4f}",
        "units/byte": "{:.3f}", "units/byte vs en": "{:.2f}", "FLOPs/byte vs en": "{:.2f}",
        "bytes vs en": "{:.2f}", "bytes/token": "{:.3f}", "tokens vs en": "{:.2f}", "fertility": "{:.2f}",
        "Rényi efficiency": "{:.3f}",
    }
    shown = frame.copy()
    for column, fmt in formats.items():
        if column in shown:
            shown[column] = shown[column].map(lambda v, fmt=fmt: fmt.format(v) if pd.notna(v) else "")
    return shown.to_markdown(index=False, disable_numparse=True)
