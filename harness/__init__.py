"""Benchmark tokenizers and byte language models under matched FLOP budgets."""

__version__ = "0.1.0"
RECORD_FORMAT_VERSION = 4  # 3: typed records (RunRecord), preparation split into declared fields and facts;
# 4: the attention window is `attn_window` in model configs
