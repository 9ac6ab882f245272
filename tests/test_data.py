import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest
import torch

from harness.run import data
from harness.errors import HarnessError
from harness.run.spec import load_corpus
from harness.orchestrate.suite import load_suite
from tests.conftest import tiny_suite


@pytest.mark.parametrize("name", data.EMBEDDED)
def test_embedded_corpora_are_real_and_deterministic(name):
    first = data.embedded_corpus(name, 50_000)
    assert len(first) == 50_000
    assert first == data.embedded_corpus(name, 50_000)
    assert first.count(b" ") > 2000  # text, not noise



def test_stdlib_docstrings_are_prose_from_the_sources_and_large_enough_not_to_repeat():
    docs = data.embedded_corpus("stdlib-docstrings", 10**8)
    assert len(docs) > 1_500_000  # a study's training split must not cycle through it many times
    sample = docs[:200_000]
    letters = sum(chr(b).isalpha() for b in sample) / len(sample)
    assert letters > 0.6 and sample.count(b"\ndef ") < 20  # English prose, not the code around it
    assert b"Record of phased-in incompatible language changes." in docs[:1000]  # __future__'s, the first file

def test_split_is_contiguous_and_hashed():
    raw = bytes(range(256)) * 10
    s = data.split("x", raw, 1000, 500, 500)
    assert s.train + s.val + s.test == raw[:2000]
    assert s.sha256 == hashlib.sha256(raw[:2000]).hexdigest()
    with pytest.raises(HarnessError, match="asks for"):
        data.split("x", raw, 3000, 1, 1)


def test_windows_drop_the_short_tail():
    w = data.windows(bytes(range(100)), 30)
    assert w.shape == (3, 30) and w[1, 0] == 30


def test_train_stream_order_depends_only_on_seed():
    train = bytes(range(256)) * 40
    a = data.TrainStream(train, 64, 4, seed=1)
    b = data.TrainStream(train, 64, 4, seed=1)
    c = data.TrainStream(train, 64, 4, seed=2)
    batches_a = [a.next_batch() for _ in range(50)]
    assert all((x == b.next_batch()).all() for x in batches_a)
    assert any((x != c.next_batch()).any() for x in batches_a)
    assert a.epoch >= 1  # 160 windows / 4 per batch = 40 batches per epoch


def test_the_train_stream_keeps_one_byte_per_byte_and_draws_int64_windows():
    train = bytes(range(256)) * 40 + b"tail"
    stream = data.TrainStream(train, 64, 4, seed=1)
    assert stream.data.dtype == torch.uint8 and stream.data.shape == (160, 64)  # a whole split as int64 is 8x its size
    batch = stream.next_batch()
    assert batch.dtype == torch.long and any((batch[0] == w).all() for w in data.windows(train, 64))
    assert (data.byte_windows(train, 64, 3).long() == data.windows(train, 64, 3)).all()
    assert data.byte_windows(b"short", 64).shape == (0, 64)


def test_files_corpus_txt_and_jsonl(tmp_path, write_suite):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_bytes(b"\x00\xffraw bytes " * 400)
    with open(tmp_path / "data" / "b.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"body": f"document {i} caf\u00e9"}) + "\n")
    suite = load_suite(write_suite(tiny_suite(
        corpus={"files": "data/*", "field": "body"},
        split={"train_bytes": 5000, "val_bytes": 2000, "test_bytes": 2000},
    )))
    splits = load_corpus(suite)
    whole = splits.train + splits.val + splits.test
    assert whole.startswith(b"\x00\xffraw bytes ")
    assert "document 0 café".encode() in whole


def test_jsonl_without_the_field_is_a_clear_error(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(HarnessError, match=r"x.jsonl:2: no string field 'text'"):
        data.files_corpus(str(tmp_path / "*.jsonl"), "text", 100)


def _zip_with(member: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, payload)
    return buffer.getvalue()


def test_url_corpus_from_a_loopback_server_with_zip_member_and_cache(tmp_path):
    payload = b"enwik-like text " * 1000
    archive = _zip_with("corpus", payload)
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.zip"
        sha = hashlib.sha256(payload).hexdigest()
        got = data.url_corpus(url, sha, "corpus", tmp_path / "cache", 5000)
        assert got == payload[:5000]
        again = data.url_corpus(url, sha, "corpus", tmp_path / "cache", 5000)
        assert again == got and len(hits) == 1  # the second call reads the cache
        with pytest.raises(HarnessError, match="has sha256 [0-9a-f]{64}, not 0{64}"):
            data.url_corpus(url, "0" * 64, "corpus", tmp_path / "other", 10)
    finally:
        server.shutdown()


def test_url_corpus_from_a_file_url(tmp_path):
    payload = b"plain file corpus " * 100
    source = tmp_path / "corpus.txt"
    source.write_bytes(payload)
    got = data.url_corpus(source.as_uri(), hashlib.sha256(payload).hexdigest(), None, tmp_path / "cache", 10**6)
    assert got == payload


def test_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="download failed"):
        data.url_corpus("http://127.0.0.1:9/none", "0" * 64, None, tmp_path, 10)


def test_presets_pin_the_well_known_files():
    assert set(data.PRESETS) == {"enwik8", "text8"}
    for preset in data.PRESETS.values():
        assert len(preset["sha256"]) == 64 and preset["url"].endswith(".zip")


# ---- corpus labels, Hugging Face datasets, missing files ---------------------------------------

def test_every_corpus_may_carry_a_label(tmp_path, write_suite):
    from harness.run.spec import expand

    (tmp_path / "notes.txt").write_bytes(b"some notes " * 1000)
    suite = load_suite(write_suite(tiny_suite(corpus=[
        {"files": "notes.txt"}, {"files": "notes.txt", "label": "notes-again"},
        {"embedded": "pydoc-topics", "label": "prose_v1.2"}])))
    assert [c.label for c in suite.corpora] == ["notes", "notes-again", "prose_v1.2"]  # default: the file stem
    assert {r.run_id.split("__")[0] for r in expand(suite)} == {"notes", "notes-again", "prose_v1.2"}
    runs = expand(suite)
    assert runs[0].config_hash(suite) == runs[1].config_hash(suite)  # the label names a run, it does not change it
    with pytest.raises(HarnessError, match=r"suite.yaml: corpus.label: 'my notes': letters, digits"):
        load_suite(write_suite(tiny_suite(corpus={"files": "notes.txt", "label": "my notes"})))
    with pytest.raises(HarnessError, match=r"corpus\[1\].label: 'a/b'"):
        load_suite(write_suite(tiny_suite(corpus=[{"embedded": "pydoc-topics"}, {"files": "notes.txt", "label": "a/b"}])))
    with pytest.raises(HarnessError, match="share the label 'notes'"):
        load_suite(write_suite(tiny_suite(corpus=[{"files": "notes.txt"}, {"embedded": "pydoc-topics", "label": "notes"}])))


def test_a_missing_files_corpus_is_found_before_any_corpus_is_loaded(tmp_path, write_suite, monkeypatch):
    monkeypatch.setattr(data, "embedded_corpus", lambda *a: pytest.fail("a corpus was loaded"))
    with pytest.raises(HarnessError, match=r"suite.yaml: corpus\[1\].files: no file matches '.*missing\*.txt'"):
        load_suite(write_suite(tiny_suite(corpus=[{"embedded": "pydoc-topics"}, {"files": "missing*.txt"}])))
    with pytest.raises(HarnessError, match=r"suite.yaml: corpus.files: no file matches"):
        load_suite(write_suite(tiny_suite(corpus={"files": "nothing.jsonl"})))


def _rows(n: int) -> list[dict]:
    return [{"id": i, "body": f"row {i}: caf\u00e9 and some more text to fill the corpus"} for i in range(n)]


def test_hf_corpus_from_a_local_parquet_file_and_folder(tmp_path, write_suite):
    import datasets

    (tmp_path / "ds").mkdir()
    datasets.Dataset.from_list(_rows(400)).to_parquet(str(tmp_path / "rows.parquet"))
    with open(tmp_path / "ds" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in _rows(400))
    sizes = {"train_bytes": 5000, "val_bytes": 2000, "test_bytes": 2000}
    expected = b"\n\n".join(row["body"].encode() for row in _rows(400))[:9000]
    from_file = load_suite(write_suite(tiny_suite(corpus={"hf": "rows.parquet", "field": "body"}, split=sizes)))
    assert from_file.corpora[0].label == "rows"
    splits = load_corpus(from_file)
    assert splits.train + splits.val + splits.test == expected
    assert splits.sha256 == hashlib.sha256(expected).hexdigest()
    assert splits.corpus_id == f"hf:{tmp_path / 'rows.parquet'}:train.body"
    from_folder = load_suite(write_suite(tiny_suite(corpus={"hf": "ds", "field": "body", "label": "mine"}, split=sizes)))
    folder_splits = load_corpus(from_folder)
    assert folder_splits.sha256 == splits.sha256 and folder_splits.corpus_id.endswith("ds:train.body")
    with pytest.raises(HarnessError, match="no string field 'text'"):
        load_corpus(load_suite(write_suite(tiny_suite(corpus={"hf": "ds"}, split=sizes))))
    with pytest.raises(HarnessError, match="cannot load it"):
        load_corpus(load_suite(write_suite(tiny_suite(corpus={"hf": "ds", "field": "body", "split": "nope"}, split=sizes))))


def test_hf_corpus_reads_only_the_rows_it_needs(tmp_path):
    import datasets

    datasets.Dataset.from_list(_rows(20_000)).to_parquet(str(tmp_path / "big.parquet"))
    corpus_id, raw = data.hf_corpus(str(tmp_path / "big.parquet"), None, "train", None, "body", 1000)
    assert len(raw) == 1000 and raw.startswith(b"row 0: caf\xc3\xa9")


def test_hf_corpus_on_the_hub_names_the_commit_it_was_pinned_to(monkeypatch):
    import datasets

    seen = {}

    def load_dataset(**arguments):
        seen.update(arguments)
        return iter([{"text": "hub text " * 50}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    commit = "0123456789abcdef0123456789abcdef01234567"
    corpus_id, raw = data.hf_corpus("someone/corpus", "en", "train", commit, "text", 100)
    assert corpus_id == f"hf:someone/corpus@{commit}/en:train.text" and len(raw) == 100
    assert seen["revision"] == commit and seen["streaming"] is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError, match="cannot resolve revision main"):
        data.hf_corpus("someone/corpus", None, "train", None, "text", 100)


def test_offset_sampling_draws_windows_anywhere_repeatably_and_resumes():
    train = bytes(range(256)) * 40
    a = data.TrainStream(train, 64, 4, seed=1, sampling="offsets")
    b = data.TrainStream(train, 64, 4, seed=1, sampling="offsets")
    batches = [a.next_batch() for _ in range(20)]
    assert all((x == b.next_batch()).all() for x in batches)
    starts = [int(w[0]) for batch in batches for w in batch]  # byte i of this split is i % 256
    assert any(s % 64 for s in starts)  # not only on window boundaries
    for w in torch.cat(batches):  # each a contiguous slice of the split
        assert (w.diff() % 256 == 1).all()
    saved = a.state_dict()
    after = a.next_batch()
    resumed = data.TrainStream(train, 64, 4, seed=7, sampling="offsets")
    resumed.load_state_dict(saved)
    assert (resumed.next_batch() == after).all()
