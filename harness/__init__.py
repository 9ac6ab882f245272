"""Benchmark tokenizers and byte language models under matched FLOP budgets."""

__version__ = "0.1.0"
RECORD_FORMAT_VERSION = 2  # 2: suites with several corpora (suite.json "corpora")
