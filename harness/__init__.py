"""Benchmark tokenizers and byte language models under matched FLOP budgets."""

__version__ = "0.1.0"
RECORD_FORMAT_VERSION = 1
