"""A parallel corpus: the same messages in several languages, so that differences between
languages come from the language and not from the text (docs/languages.md).

Source `django-locale`: the gettext catalogues (django.po, djangojs.po) that the installed
`django` package ships in django/conf/locale and in each contrib app's locale folder, under
Django's licence (BSD-3-Clause). A message is (context, msgid): English is the msgid, another
language its msgstr (msgstr[0] for a plural entry); fuzzy and untranslated entries are skipped,
and a message found in two catalogues is one message (the first translation, in catalogue order).

- Alignment: a message is kept only if every chosen language translates it.
- Split: by a seeded hash of the message, the same for every language, so each language's
  val and test text is the translation of the same messages.
- Text: a language's messages joined by "\\n", in the English catalogues' order; a mix is the
  languages' texts one after another (each repeated `weight` times in training).
- Size: each split keeps the first messages whose mix fits in the suite's split bytes (short of
  them by less than one message in every language); a mix shorter than asked is an error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.run.data import CorpusError, Splits

SOURCES = ("django-locale",)
LICENCE = "BSD-3-Clause"  # Django's, under which its catalogues ship
SOURCE_LANGUAGE = "en"
# written without spaces between words: fertility is counted per character there
WITHOUT_SPACES = frozenset({"zh_Hans", "zh_Hant", "ja", "th", "km", "lo", "my"})
SPLITS = ("train", "val", "test")

Key = tuple[str, str]  # (msgctxt, msgid)


def django_root() -> Path:
    try:
        import django
    except ImportError:
        raise CorpusError("parallel", "the `django` package is not installed (pip install 'django==5.2.20', the version the project pins); "
                                      "its translation catalogues are the corpus") from None
    return Path(django.__file__).parent


def django_version() -> str:
    django_root()
    import django

    return django.__version__


def available_languages() -> list[str]:
    """The language codes of Django's own catalogue (conf/locale), English included."""
    return sorted(p.parts[-3] for p in (django_root() / "conf" / "locale").glob("*/LC_MESSAGES/django.po"))


def translations(language: str) -> dict[Key, str]:
    """Each message's text in `language`, in the order of the catalogues (sorted by path), then
    the entries in each; English gives every msgid, whether translated or not."""
    import polib

    root, texts = django_root(), {}
    for path in sorted(root.glob(f"**/locale/{language}/LC_MESSAGES/*.po"), key=lambda p: p.relative_to(root).as_posix()):
        for entry in polib.pofile(str(path)):
            if entry.obsolete or (language != SOURCE_LANGUAGE and "fuzzy" in entry.flags):
                continue
            text = entry.msgid if language == SOURCE_LANGUAGE else (
                entry.msgstr_plural.get(0, "") if entry.msgid_plural else entry.msgstr)
            key = (entry.msgctxt or "", entry.msgid)
            if text and key not in texts:
                texts[key] = text
    return texts


def split_of(key: Key, seed: int, val_share: float, test_share: float) -> str:
    """train, val or test: a uniform draw from the hash of (seed, context, msgid)."""
    digest = hashlib.sha256("\0".join((str(seed), *key)).encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if draw < test_share else "val" if draw < test_share + val_share else "train"


def aligned_messages(languages: list[str]) -> list[tuple[Key, dict[str, str]]]:
    """The messages every language translates, in the English catalogues' order: (key, language -> text)."""
    known = available_languages()
    unknown = [code for code in languages if code not in known]
    if unknown:
        raise CorpusError("languages", f"{', '.join(map(repr, unknown))} not in Django {django_version()}'s "
                                       f"catalogues; available: {', '.join(known)}")
    texts = {code: translations(code) for code in languages}
    order = texts[SOURCE_LANGUAGE] if SOURCE_LANGUAGE in texts else translations(SOURCE_LANGUAGE)
    return [(key, {code: texts[code][key] for code in languages}) for key in order
            if all(key in texts[code] for code in languages)]


def mix_text(messages: list[dict[str, str]], weights: dict[str, int]) -> bytes:
    """Each language's messages joined by newlines, `weight` times, the blocks joined by a newline."""
    blocks = [language_text(messages, code) for code, weight in weights.items() for _ in range(weight)]
    return b"\n".join(blocks)


def language_text(messages: list[dict[str, str]], code: str) -> bytes:
    return "\n".join(m[code] for m in messages).encode("utf-8")


def fitting(messages: list[dict[str, str]], weights: dict[str, int], limit: int) -> int:
    """How many leading messages make a mix of at most `limit` bytes."""
    size = -1  # n messages in B blocks: the texts, n - 1 newlines per block, B - 1 between blocks
    for count, message in enumerate(messages):
        size += sum(weight * (len(message[code].encode("utf-8")) + 1) for code, weight in weights.items())
        if size > limit:
            return count
    return len(messages)


def parallel_corpus(source: str, languages: list[str], weights: dict[str, int], val_share: float,
                    test_share: float, seed: int, sizes: dict[str, int]) -> Splits:
    """The splits of a parallel corpus: training text in the mix `weights` (language -> repeats),
    val and test with each mixed language once, each cut to the first messages that fit in
    sizes[split] bytes; and each chosen language's test text (the same messages as the test mix)."""
    if source not in SOURCES:
        raise CorpusError("parallel", f"unknown parallel corpus {source!r} (known: {', '.join(SOURCES)})")
    by_split = {name: [] for name in SPLITS}
    for key, texts in aligned_messages(languages):
        by_split[split_of(key, seed, val_share, test_share)].append(texts)
    mixes = {"train": {c: w for c, w in weights.items() if w}, "val": {c: 1 for c, w in weights.items() if w}}
    mixes["test"] = mixes["val"]
    held = {name: len(mix_text(by_split[name], mixes[name])) for name in SPLITS}
    for name in SPLITS:
        if held[name] < sizes[name]:
            raise CorpusError("split", f"{source} ({len(languages)} languages, val/test shares {val_share:g}/"
                                          f"{test_share:g}) holds train/val/test mixes of {held['train']}/{held['val']}/"
                                          f"{held['test']} bytes; split.{name}_bytes asks for {sizes[name]}")
        by_split[name] = by_split[name][:fitting(by_split[name], mixes[name], sizes[name])]
    texts = {name: mix_text(by_split[name], mixes[name]) for name in SPLITS}
    mix = "parallel" if set(weights.values()) == {1} else ",".join(f"{c}:{w}" for c, w in weights.items())
    corpus_id = (f"parallel:{source}@django-{django_version()} ({LICENCE}):{','.join(languages)};mix={mix};"
                 f"val={val_share:g},test={test_share:g},seed={seed}")
    return Splits(corpus_id, hashlib.sha256(b"".join(texts.values())).hexdigest(), **texts,
                  test_languages={code: language_text(by_split["test"], code) for code in languages})


def tokenizer_facts(metrics: dict, text: bytes, code: str) -> dict:
    """A tokenizer's figures on one language's text (its tokenizer_metrics there): tokens, bytes per
    token, Rényi efficiency, and fertility: tokens per whitespace-separated word, or per character
    (whitespace left out) for a language written without spaces."""
    decoded = text.decode("utf-8")
    per = "character" if code in WITHOUT_SPACES else "word"
    units = len("".join(decoded.split())) if per == "character" else len(decoded.split())
    return {"tokens": metrics["tokens_test"], "bytes_per_token": metrics["bytes_per_token_test"],
            "renyi_efficiency": metrics["renyi_efficiency_test"], "fertility": metrics["tokens_test"] / units,
            "fertility_per": per}
