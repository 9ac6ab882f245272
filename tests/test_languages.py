"""The parallel corpus (harness/run/parallel.py) and per-language evaluation: languages aligned
message by message, one split per message, per-language cost counted on that language's windows,
and the report's language section with premiums relative to English."""

import numpy as np
import pytest
import yaml

from harness.analysis.noise import noise_table
from harness.analysis.report import build_report
from harness.errors import HarnessError
from harness.orchestrate.runner import run_suite
from harness.orchestrate.suite import load_suite
from harness.run import data, noise, parallel
from harness.run.checkpoint import load_checkpoint
from harness.run.records import read_suite_records
from harness.run.spec import load_corpus
from tests.conftest import tiny_suite
from tests.test_test_sets import reference_flops_per_byte

LANGUAGES = ["en", "de", "tr", "ru", "zh_Hans"]
SIZES = {"train": 30000, "val": 4000, "test": 12000}
RUN_LANGUAGES = ["en", "ru", "zh_Hans"]  # the trained run: few windows, for speed


def corpus(**overrides) -> dict:
    return {"parallel": "django-locale", "languages": LANGUAGES} | overrides


def splits_of(write_suite, **overrides):
    suite = tiny_suite(corpus=corpus(**overrides), split={f"{k}_bytes": v for k, v in SIZES.items()})
    return load_corpus(load_suite(write_suite(suite)))


def test_each_language_tests_the_same_messages_and_no_message_is_in_two_splits(write_suite):
    splits = splits_of(write_suite)
    messages = parallel.aligned_messages(LANGUAGES)
    drawn = {name: [texts for key, texts in messages if parallel.split_of(key, 0, 0.1, 0.2) == name]
             for name in parallel.SPLITS}
    assert sum(map(len, drawn.values())) == len(messages) > 300  # every message in exactly one split
    english = splits.test_languages["en"]
    n = next(n for n in range(len(drawn["test"]) + 1)
             if "\n".join(t["en"] for t in drawn["test"][:n]).encode() == english)
    assert n > 50
    for code in LANGUAGES:  # exactly the translations of the same n messages, in the same order
        assert splits.test_languages[code] == "\n".join(t[code] for t in drawn["test"][:n]).encode()
    assert parallel.translations("tr")[("", "Enter a valid integer.")] == "Geçerli bir tamsayı girin."
    # the test mix is those texts one language after another, the others hold no test message
    assert splits.test == b"\n".join(splits.test_languages[c] for c in LANGUAGES)
    assert len(splits.test) <= SIZES["test"] and len(splits.train) <= SIZES["train"]
    test_keys = {key for key, _ in messages if parallel.split_of(key, 0, 0.1, 0.2) == "test"}
    train_keys = {key for key, _ in messages if parallel.split_of(key, 0, 0.1, 0.2) == "train"}
    assert not test_keys & train_keys and abs(len(test_keys) / len(messages) - 0.2) < 0.05


def test_the_corpus_is_deterministic_and_its_seed_redraws_the_split(write_suite):
    first, second = splits_of(write_suite), splits_of(write_suite)
    assert first == second and "django-locale@django-" in first.corpus_id and "BSD-3-Clause" in first.corpus_id
    other = splits_of(write_suite, split_seed=1)
    assert other.test_languages["de"] != first.test_languages["de"] and "seed=1" in other.corpus_id


def test_a_mix_weight_repeats_a_language_in_training_and_0_leaves_it_to_the_test(write_suite):
    plain, weighted = splits_of(write_suite), splits_of(write_suite, mix={"de": 2, "ru": 0})
    train = [t for key, t in parallel.aligned_messages(LANGUAGES) if parallel.split_of(key, 0, 0.1, 0.2) == "train"]
    message = next(t for t in train if len(t["de"]) > 20 and "\n" not in t["de"] + t["ru"])
    lines = {name: splits.train.split(b"\n") for name, splits in (("plain", plain), ("weighted", weighted))}
    assert lines["plain"].count(message["de"].encode()) == 1 and lines["weighted"].count(message["de"].encode()) == 2
    assert lines["plain"].count(message["ru"].encode()) == 1 and lines["weighted"].count(message["ru"].encode()) == 0
    assert weighted.test == b"\n".join(weighted.test_languages[c] for c in ["en", "de", "tr", "zh_Hans"])
    assert weighted.test_languages["ru"] and "mix=en:1,de:2,tr:1,ru:0,zh_Hans:1" in weighted.corpus_id


@pytest.mark.parametrize("change, message", [
    (dict(languages=["en", "xx"]), "corpus.languages: 'xx' not in Django"),
    (dict(mix={"fr": 1}), "corpus: mix: fr not among the languages"),
    (dict(mix={"en": 0, "de": 0, "tr": 0, "ru": 0, "zh_Hans": 0}), "every weight is 0"),
])
def test_bad_languages_are_one_line_errors_naming_the_key(write_suite, change, message):
    with pytest.raises(HarnessError) as error:
        splits_of(write_suite, **change)
    assert message in str(error.value) and "\n" not in str(error.value)
    if "xx" in message:
        assert "available: " in str(error.value) and ", de, " in str(error.value)


def test_a_split_larger_than_the_corpus_is_one_line_naming_the_split(write_suite):
    suite = tiny_suite(corpus=corpus(), split={"train_bytes": 10**7, "val_bytes": 4000, "test_bytes": 4000})
    with pytest.raises(HarnessError, match=r"suite.yaml: split: django-locale .* holds train/val/test mixes of "
                                           r"\d+/\d+/\d+ bytes; split.train_bytes asks for 10000000"):
        load_corpus(load_suite(write_suite(suite)))


def test_renyi_efficiency_matches_the_reference_implementation():
    scorer = pytest.importorskip("tokenization_scorer.metrics")  # Zouhar et al.'s own package (test extra)
    from baselines.token_lm import renyi_efficiency

    ids = np.random.default_rng(0).zipf(1.5, 5000) % 300
    reference = scorer.get_metric("renyi")([[str(i) for i in ids]], power=2.5, vocab=512)
    assert renyi_efficiency(np.bincount(ids, minlength=512), 512) == pytest.approx(reference, rel=1e-9)
    assert renyi_efficiency(np.ones(512), 512) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory):
    """One BPE model trained on the parallel mix of three languages, with its record."""
    folder = tmp_path_factory.mktemp("multilingual")
    suite = tiny_suite(name="languages", corpus=corpus(languages=RUN_LANGUAGES), budgets=[5e8],
                       split={f"{k}_bytes": v for k, v in SIZES.items()},
                       eval={"window": 64, "max_windows": 8, "batch_windows": 8,
                             "noise": {"language": "en", "rules": {"case": {"case": 0.2}}}},
                       models=[{"name": "bpe", "adapter": "bpe",
                                "config": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2}}])
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out = run_suite(path, folder / "results", "cpu", show_progress=False)
    return load_suite(path), out, read_suite_records(out)[0]


def test_each_language_is_charged_the_flops_counted_on_its_own_windows(multilingual_run):
    suite, out, record = multilingual_run
    assert [name for name in record.test_sets if name.startswith("lang:")] == [f"lang:{c}" for c in RUN_LANGUAGES]
    model = load_checkpoint(out / "runs" / record.run_id).eval()
    texts = load_corpus(suite).test_languages
    for code in RUN_LANGUAGES:
        windows = data.windows(texts[code], suite.eval.window, suite.eval.max_windows)
        entry = record.test_sets[f"lang:{code}"]
        assert entry.kind == "language" and entry.bytes == windows.numel() and entry.text_bytes == len(texts[code])
        assert entry.flops_per_byte == pytest.approx(reference_flops_per_byte(model, windows), rel=1e-9)
        assert entry.tokenizer["fertility_per"] == ("character" if code == "zh_Hans" else "word")
    costs = {code: record.test_sets[f"lang:{code}"].flops_per_byte for code in RUN_LANGUAGES}
    assert costs["ru"] < costs["en"]  # Cyrillic takes two bytes a letter: fewer tokens per byte


def test_noise_on_one_language_noises_that_language_s_test_text(multilingual_run):
    suite, _, record = multilingual_run
    english = load_corpus(suite).test_languages["en"]
    noised = noise.apply(english, "case", 0.2, None, 0).text
    assert record.test_sets["noise:case"].bytes == data.windows(noised, 64, 8).numel()
    clean = data.windows(english, 64, 8)  # continuations: the second halves of English's windows after the first
    assert record.test_sets["noise:clean-after-clean"].bytes == (len(clean) - 1) * 32
    (row,) = noise_table([record]).to_dict("records")  # the degradation is against clean English, not the mix
    assert row["clean bpb"] == record.test_sets["lang:en"].bpb
    assert row["noised bpb"] - row["clean bpb"] == pytest.approx(row["Δ bpb"])


def test_the_report_shows_each_language_against_english(multilingual_run, tmp_path):
    _, out, record = multilingual_run
    report = build_report(out, tmp_path)
    section = report[report.index("### Languages"):report.index("### Reference rows")]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    english = next(row for row in rows if row[header.index("language")].strip() == "en")
    for column in ("units/byte vs en", "FLOPs/byte vs en", "bytes vs en"):
        assert english[header.index(column)].strip() == "1.00"
    russian = next(row for row in rows if row[header.index("language")].strip() == "ru")
    en_units, ru_units = (record.test_sets[f"lang:{c}"].units_per_byte for c in ("en", "ru"))
    assert russian[header.index("units/byte vs en")].strip() == f"{ru_units / en_units:.2f}"
    assert "Rényi efficiency" in section and (tmp_path / "plots" / "languages_django-locale_5.00e08.png").exists()
