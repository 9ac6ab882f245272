"""Suite files: validated YAML that expands into runs (models x budgets x seeds); the schema
is harness/run/spec.py.

Every error names the file and the key and fits on one line, e.g.
`suites/x.yaml: models[1].config.d_model: Input should be a valid integer`.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from harness.api import registry
from harness.modeling.flops import training_steps
from harness.run.budget import training_flops_per_byte
from harness.errors import HarnessError
from harness.run.spec import FilesCorpus, HfCorpus, Row, Suite, Corpus, SUITE_FORMAT_VERSION

def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("EmbeddedCorpus", "FilesCorpus", "UrlCorpus", "PresetCorpus", "HfCorpus", "ParallelCorpus",
                      "function-after[_unique_names()]") or str(part).startswith(("list[", "function-after[_mix")):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _first_error(path: Path, error: ValidationError, prefix: str = "") -> HarnessError:
    errors = error.errors()
    if prefix == "" and any(e["loc"][:1] == ("corpus",) for e in errors):
        bad_label = next((e for e in errors if e["loc"][:1] == ("corpus",) and e["loc"][-1] == "label"
                          and e["type"] == "string_pattern_mismatch"), None)
        if bad_label is not None:  # the form matched, the label did not
            return HarnessError(f"{path}: {_location(bad_label['loc'])}: {bad_label['input']!r}: "
                                "letters, digits, '.', '_' and '-' only")
        chosen = [e for e in errors if any("ParallelCorpus" in str(part) for part in e["loc"])]
        if chosen and not any(e["type"] == "missing" and e["loc"][-1] == "parallel" for e in chosen):
            errors = chosen  # a parallel corpus (its key given) with a bad setting: name that setting
        else:  # a corpus matches none of its forms: say which keys each form takes
            return _corpus_forms(path)
    first = errors[0]
    key = _location(first["loc"])
    key = f"{prefix}.{key}" if prefix and key != "(top level)" else (prefix or key)
    message = first["msg"].removeprefix("Value error, ")
    if key == "(top level)" and message != first["msg"]:
        return HarnessError(f"{path}: {message}")  # a whole-suite check names its own key
    return HarnessError(f"{path}: {key}: {message}")


def _corpus_forms(path: Path) -> HarnessError:
    return HarnessError(
        f"{path}: corpus: expected one of {{embedded: pydoc-topics|stdlib-code|stdlib-docstrings}}, "
        "{files: GLOB, field: NAME}, {url: URL, sha256: HEX, member: NAME}, {preset: enwik8|text8}, "
        "{hf: NAME|PATH, config: NAME, split: NAME, revision: REV, field: NAME}, "
        "{parallel: django-locale, languages: [CODE, ...], mix: parallel|{CODE: REPEATS}, val_share: S, "
        "test_share: S, split_seed: N}, each with an optional label: NAME"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` is not a key of its own
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# YAML 1.2's booleans, true and false only: YAML 1.1 also reads on, off, yes and no as booleans, which
# would make a factor's levels `off: {}` and `on: {...}` the keys false and true
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such suite file")
    content = path.read_bytes()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        line = content[:e.start].count(b"\n") + 1
        raise HarnessError(f"{path}: line {line}: not UTF-8 text (byte 0x{content[e.start]:02x})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise HarnessError(f"{path}: line {line}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: a suite is a mapping of keys (name, corpus, split, eval, budgets, models, ...)")
    try:
        suite = Suite(**raw)
    except ValidationError as e:
        raise _first_error(path, e) from None
    if suite.version != SUITE_FORMAT_VERSION:
        raise HarnessError(f"{path}: version: this harness reads suite format {SUITE_FORMAT_VERSION}, not {suite.version}")
    corpora = [_relative_to(path, c) for c in suite.corpora]
    suite = suite.model_copy(update={"corpus": corpora if isinstance(suite.corpus, list) else corpora[0]})
    suite._source = str(path)
    _check_files(path, suite)
    _check_models(path, suite)
    return suite


def _check_factors(path: Path, suite: Suite) -> None:
    """Each factor crosses at least one model, whose config has every key its levels set, and no
    two factors set one key of a model."""
    entries = {m.name: m for m in suite.models}
    crossing: dict[str, list[str]] = {}
    for name, factor in (suite.factors or {}).items():
        models = suite.factor_models(name)
        if not models:
            raise HarnessError(f"{path}: factors.{name}: no model's config has {', '.join(sorted(factor.keys))}; "
                               f"name the models it crosses in factors.{name}.models")
        for model in models:
            fields = registry.get(entries[model].adapter).Config.model_fields
            for level, keys in factor.levels.items():
                missing = [key for key in keys if key not in fields]
                if missing:
                    raise HarnessError(f"{path}: factors.{name}.levels.{level}.{missing[0]}: model {model!r} "
                                       f"(adapter {entries[model].adapter}) has no such config key")
            for other in crossing.setdefault(model, []):
                shared = factor.keys & suite.factors[other].keys
                if shared:
                    raise HarnessError(f"{path}: factors.{name}: sets {', '.join(sorted(shared))} of model {model!r}, "
                                       f"as factors.{other} does (which level would win?)")
            crossing[model].append(name)


def _relative_to(path: Path, corpus: Corpus) -> Corpus:
    """File globs, and local datasets that exist beside the suite file, are relative to the suite file."""
    if isinstance(corpus, FilesCorpus) and not Path(corpus.files).is_absolute():
        return corpus.model_copy(update={"files": str(path.parent / corpus.files)})
    if isinstance(corpus, HfCorpus) and not Path(corpus.hf).is_absolute() and (path.parent / corpus.hf).exists():
        return corpus.model_copy(update={"hf": str(path.parent / corpus.hf)})
    return corpus


def _check_files(path: Path, suite: Suite) -> None:
    """Every `files:` glob matches a file, before any corpus is loaded."""
    for i, corpus in enumerate(suite.corpora):
        if isinstance(corpus, FilesCorpus) and not glob.glob(corpus.files, recursive=True):
            key = f"corpus[{i}].files" if isinstance(suite.corpus, list) else "corpus.files"
            raise HarnessError(f"{path}: {key}: no file matches {corpus.files!r}")


def _check_models(path: Path, suite: Suite) -> None:
    """Every row (a model, or a model crossed with factor levels) builds and affords a step at every budget."""
    for i, entry in enumerate(suite.models):
        try:
            registry.get(entry.adapter)
        except HarnessError as e:
            raise HarnessError(f"{path}: models[{i}].adapter: {e}") from None
    _check_factors(path, suite)
    index = {m.name: i for i, m in enumerate(suite.models)}
    for entry in suite.rows:
        i = index[entry.name.split("+")[0]]
        levels = entry.factors if isinstance(entry, Row) else {}
        set_by = {key: f"factors.{name}.levels.{level}" for name, level in levels.items()
                  for key in suite.factors[name].levels[level]}  # a level's key is named where the level sets it
        cls = registry.get(entry.adapter)
        try:
            model = cls(cls.Config(**entry.config))
        except ValidationError as e:
            loc = e.errors()[0]["loc"]
            raise _first_error(path, e, prefix=set_by.get(loc[0] if loc else None, f"models[{i}].config")) from None
        except (ValueError, HarnessError) as e:
            row = f" (row {entry.name})" if levels else ""
            raise HarnessError(f"{path}: models[{i}].config{row}: {e}") from None
        batch_windows = entry.trainer.batch_windows or suite.trainer.batch_windows
        if batch_windows * suite.eval.window > suite.split.train_bytes:
            key = f"models[{i}].trainer.batch_windows" if entry.trainer.batch_windows else "trainer.batch_windows"
            raise HarnessError(f"{path}: {key}: a batch of {batch_windows} windows of {suite.eval.window} bytes is more "
                               f"than the training split holds (split.train_bytes {suite.split.train_bytes})")
        batch = batch_windows * suite.eval.window
        tune_budgets = [("tune.budgets", b) for b in suite.tune.budgets] if suite.tune else []
        for key, budget in [("budgets", b) for b in suite.budgets] + tune_budgets:
            target = suite.inference_target(budget)  # the model will be resized to about this cost
            forward = model.flops_per_byte(suite.eval.window) if target is None else {"total": target}
            per_byte = training_flops_per_byte(forward, suite.count_auxiliary_flops)
            step_flops = per_byte * batch
            if training_steps(budget, per_byte, batch) < 1:
                raise HarnessError(
                    f"{path}: {key}: {budget:.3g} FLOPs is less than one optimizer step of "
                    f"model {entry.name!r} ({step_flops:.3g} FLOPs)"
                )


