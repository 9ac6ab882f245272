import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest

from harness.core import data
from harness.errors import HarnessError
from harness.core.suite import load_corpus, load_suite
from tests.conftest import tiny_suite


@pytest.mark.parametrize("name", data.EMBEDDED)
def test_embedded_corpora_are_real_and_deterministic(name):
    first = data.embedded_corpus(name, 50_000)
    assert len(first) == 50_000
    assert first == data.embedded_corpus(name, 50_000)
    assert first.count(b" ") > 2000  # text, not noise


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
        with pytest.raises(HarnessError, match="sha256 is"):
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
