"""One per-user cache folder for everything the harness caches (harness.storage)."""

from pathlib import Path

from baselines import token_lm
from harness.run import references
from harness.storage import cache_dir


def test_cache_dir_is_per_user_unless_harness_cache_dir_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("tokenizers") == tmp_path / "home" / ".cache" / "tokenizer-harness" / "tokenizers"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("tokenizers") == tmp_path / "xdg" / "tokenizer-harness" / "tokenizers"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir("references") == tmp_path / "mine" / "references"


def test_tokenizers_and_references_share_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert token_lm.cache_dir() == tmp_path / "tokenizer-harness" / "tokenizers"  # not under the working directory
    assert references.cache_dir() == tmp_path / "tokenizer-harness" / "references"
    assert token_lm.cache_dir().parent == references.cache_dir().parent == cache_dir("x").parent
    assert not Path(".cache").exists()
