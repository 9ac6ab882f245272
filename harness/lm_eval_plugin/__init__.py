"""The lm-evaluation-harness plugin: any harness run as an lm-eval model, and tasks that
score a harness suite's own held-out data.

Importing this package registers the model `harness` in lm-eval's model registry
(lm-eval 0.4 has no entry-point discovery for models). Two routes:

    harness lm-eval --model harness --model_args pretrained=results/smoke/runs/RUN_ID \\
        --tasks harness_bpb,harness_arc_easy_local --device cpu

    import lm_eval, harness.lm_eval_plugin as plugin
    results = lm_eval.simple_evaluate(
        model="harness", model_args={"pretrained": run_dir}, tasks=["harness_bpb"],
        task_manager=plugin.task_manager(pretrained=run_dir))

The tasks live in TASKS_DIR (shipped with the package): `harness_bpb` scores the test
split of the run's suite, one evaluation window per document, so its bits_per_byte is the
harness evaluator's test bpb; `harness_arc_easy_local` is lm-eval's own `arc_easy` task
run on a small local data file, so that a built-in task runs with no download.

Text and bytes: lm-eval hands models strings, the harness scores bytes. A string becomes
bytes as UTF-8; `bytes_to_text` is the inverse for arbitrary bytes (an evaluation window
may cut a character in two, and invalid UTF-8 is legal corpus data): each byte that is
not part of a valid UTF-8 character is written as one character of U+10FF80..U+10FFFF
(Supplementary Private Use Area-B), and a genuine character of that range is written as
its four bytes, so the mapping is lossless for every byte string and the text stays valid
Unicode (it can be stored in an Arrow table and written to JSON).
"""

from __future__ import annotations

import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RAW_BYTE_BASE = 0x10FF00  # raw byte b (0x80..0xFF) <-> chr(RAW_BYTE_BASE + b), U+10FF80..U+10FFFF

_NEEDS_ESCAPE = re.compile("[\udc80-\udcff\U0010ff80-\U0010ffff]")
_ESCAPED = re.compile("[\U0010ff80-\U0010ffff]+")


def _escape(match: re.Match) -> str:
    char = match.group()
    if 0xDC80 <= ord(char) <= 0xDCFF:  # surrogateescape's stand-in for a raw byte 0x80..0xFF
        return chr(RAW_BYTE_BASE + ord(char) - 0xDC00)
    return "".join(chr(RAW_BYTE_BASE + b) for b in char.encode("utf-8"))  # a genuine U+10FF80..U+10FFFF


def bytes_to_text(data: bytes) -> str:
    """Lossless bytes -> str: valid UTF-8 decodes as usual, other bytes become U+10FF80 + (b - 0x80)."""
    return _NEEDS_ESCAPE.sub(_escape, data.decode("utf-8", "surrogateescape"))


def text_to_bytes(text: str) -> bytes:
    """The bytes a string stands for: its UTF-8 encoding, with U+10FF80..U+10FFFF read back as raw bytes.
    (Python's surrogateescape stand-ins U+DC80..U+DCFF are read as raw bytes too.)"""
    parts, position = [], 0
    for match in _ESCAPED.finditer(text):
        parts.append(text[position : match.start()].encode("utf-8", "surrogateescape"))
        parts.append(bytes(ord(c) - RAW_BYTE_BASE for c in match.group()))
        position = match.end()
    parts.append(text[position:].encode("utf-8", "surrogateescape"))
    return b"".join(parts)


def include_paths(extra: str | Path | list | tuple | None = None) -> list[str]:
    """TASKS_DIR followed by the user's own include path(s) (later paths override earlier ones)."""
    paths = [str(TASKS_DIR)]
    for path in [] if extra is None else list(extra) if isinstance(extra, (list, tuple)) else [extra]:
        if Path(path).resolve() != TASKS_DIR:
            paths.append(str(path))
    return paths


def task_manager(include_defaults: bool = True, include_path=None, **metadata):
    """An lm-eval TaskManager that knows the plugin's tasks. `metadata` reaches the tasks:
    `pretrained=RUN_DIR` (or `suite=SUITE.yaml | RESULTS_DIR`) says whose test split
    `harness_bpb` scores. include_defaults=False skips indexing lm-eval's ~15k built-in
    task files (about 20 s) when only the plugin's `harness_bpb` is needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_paths(include_path), include_defaults=include_defaults, metadata=metadata)


from harness.lm_eval_plugin.model import HarnessLM  # noqa: E402  (registers the model `harness`)

__all__ = ["HarnessLM", "TASKS_DIR", "bytes_to_text", "include_paths", "task_manager", "text_to_bytes"]
