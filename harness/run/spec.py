"""The typed middle: a suite as validated data (corpora, split, trainer, evaluation, budgets,
tuning, executor), the runs it expands into, and the corpus splits a run reads. Loading a
suite file (YAML, one-line errors naming the file and key) is harness/orchestrate/suite.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator

from harness.errors import HarnessError
from harness.run import data, noise, parallel

SUITE_FORMAT_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf and .nan are never a setting


LABEL_PATTERN = r"^[A-Za-z0-9_.-]+$"  # corpus labels, model names, factors and levels: they appear in run ids
Label = Annotated[str, Field(pattern=LABEL_PATTERN)]


class _CorpusSource(Strict):
    """What every corpus form shares: `label`, its name in run ids and tables (default: from the source)."""

    label: str = Field(pattern=LABEL_PATTERN, description="corpus label in run ids and tables; default from the source")

    @model_validator(mode="before")
    @classmethod
    def _default_label(cls, values):
        if isinstance(values, dict) and values.get("label") is None:
            values = {**values, "label": cls.source_label(values) or "corpus"}
        return values

    @staticmethod
    def source_label(values: dict) -> str:
        raise NotImplementedError


class EmbeddedCorpus(_CorpusSource):
    embedded: Literal["pydoc-topics", "stdlib-code", "stdlib-docstrings"] = Field(description="corpus that ships with Python")

    @staticmethod
    def source_label(values: dict) -> str:
        return str(values.get("embedded", ""))


class FilesCorpus(_CorpusSource):
    files: str = Field(description="path or glob of .txt / .jsonl files, relative to the suite file")
    field: str = Field("text", description="JSON field holding the text of a .jsonl line")

    @staticmethod
    def source_label(values: dict) -> str:
        return _slug(Path(str(values.get("files", ""))).stem) or "files"


class UrlCorpus(_CorpusSource):
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the downloaded file, or of `member` if given")
    member: str | None = Field(None, description="file inside a zip archive")
    cache_dir: str = Field(".cache/harness", description="download cache, relative to the working directory")

    @staticmethod
    def source_label(values: dict) -> str:
        return _slug(Path(str(values.get("member") or str(values.get("url", "")).rstrip("/"))).name.split(".")[0]) or "url"


class PresetCorpus(_CorpusSource):
    preset: Literal["enwik8", "text8"]
    cache_dir: str = ".cache/harness"

    @staticmethod
    def source_label(values: dict) -> str:
        return str(values.get("preset", ""))


class HfCorpus(_CorpusSource):
    hf: str = Field(description="Hugging Face dataset: a Hub name, or a local folder or data file (relative to the "
                                "suite file) that `datasets.load_dataset` reads")
    config: str | None = Field(None, description="dataset configuration (subset) name")
    split: str = "train"
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch); the commit it resolves to "
                                                   "is recorded in the corpus id")
    field: str = Field("text", description="column holding each row's text")

    @staticmethod
    def source_label(values: dict) -> str:
        name = _slug(Path(str(values.get("hf", "")).rstrip("/")).name.split(".")[0]) or "hf"
        return f"{name}-{_slug(str(values['config']))}" if values.get("config") else name


class ParallelCorpus(_CorpusSource):
    """The same messages in several languages (harness/run/parallel.py; docs/languages.md)."""

    parallel: Literal["django-locale"] = Field(description="the translation catalogues of the installed django package")
    languages: list[str] = Field(min_length=1, description="language codes (Django's: en, de, zh_Hans, ...); a "
                                                           "message is kept when every one translates it")
    mix: Literal["parallel"] | dict[str, Annotated[int, Field(ge=0)]] = Field(
        "parallel", description="training mix: parallel (every language once), or language -> repeats of its "
                                "training text (unnamed: 1; 0 leaves it out of training, still tested)")
    val_share: float = Field(0.1, gt=0, lt=1, description="share of the messages drawn into val")
    test_share: float = Field(0.2, gt=0, lt=1, description="share of the messages drawn into test")
    split_seed: int = Field(0, ge=0, description="seed of the hash that draws each message's split")

    @model_validator(mode="after")
    def _mix_names_languages(self):
        if len(set(self.languages)) < len(self.languages):
            raise ValueError(f"languages: {max(self.languages, key=self.languages.count)!r} is named twice")
        if self.val_share + self.test_share >= 1:
            raise ValueError("val_share + test_share leaves no message for training")
        if isinstance(self.mix, dict):
            unknown = [code for code in self.mix if code not in self.languages]
            if unknown:
                raise ValueError(f"mix: {', '.join(unknown)} not among the languages ({', '.join(self.languages)})")
            if not any(self.weights.values()):
                raise ValueError("mix: every weight is 0; nothing to train on")
        return self

    @property
    def weights(self) -> dict[str, int]:
        """Language -> repeats of its training text, in the order of `languages`."""
        given = {} if self.mix == "parallel" else self.mix
        return {code: given.get(code, 1) for code in self.languages}

    @staticmethod
    def source_label(values: dict) -> str:
        return _slug(str(values.get("parallel", "")))


Corpus = Union[EmbeddedCorpus, FilesCorpus, UrlCorpus, PresetCorpus, HfCorpus, ParallelCorpus]


def _slug(text: str) -> str:
    """A corpus label usable in run ids: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


class SplitSizes(Strict):
    train_bytes: int = Field(gt=0)
    val_bytes: int = Field(gt=0)
    test_bytes: int = Field(gt=0)


class NoiseRule(Strict):
    """One noise rule for the test split (harness.run.noise, docs/noise.md): exactly one of typos,
    case and whitespace, a rate in [0, 1], and for typos or whitespace optional shares of their edits."""

    typos: float | None = Field(None, ge=0, le=1, description="per byte: substitute, insert, delete or transpose")
    case: float | None = Field(None, ge=0, le=1, description="per ASCII letter: flip its case")
    whitespace: float | None = Field(None, ge=0, le=1, description="per ASCII whitespace byte: delete, duplicate "
                                                                   "or swap (space <-> newline)")
    shares: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="relative weights of the rule's edits (default: equal); an edit left out is never drawn")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [kind for kind in noise.EDITS if getattr(self, kind) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(noise.EDITS)} (a rule with several is several rules)")
        edits = noise.EDITS[self.kind]
        if self.shares is not None:
            if len(edits) == 1:
                raise ValueError(f"shares: a {self.kind} rule has one edit ({edits[0]}); leave shares out")
            unknown = sorted(set(self.shares) - set(edits))
            if unknown:
                raise ValueError(f"shares: {', '.join(unknown)}: the {self.kind} edits are {', '.join(edits)}")
            if sum(self.shares.values()) <= 0:
                raise ValueError("shares: at least one edit needs a positive share")
        return self

    @model_serializer(mode="wrap")
    def _set_keys_only(self, dump):
        """The keys the rule sets: records read as the suite was written, and a kind added later
        leaves the config hashes of older rules as they were."""
        return {key: value for key, value in dump(self).items() if value is not None}

    @property
    def kind(self) -> str:
        return next(kind for kind in noise.EDITS if getattr(self, kind) is not None)

    @property
    def rate(self) -> float:
        return getattr(self, self.kind)


class NoiseSettings(Strict):
    """Noised copies of the test split that every run also scores (docs/noise.md): one seed for every
    model and training seed, so that all rows score the same noised bytes."""

    seed: int = Field(0, ge=0, lt=2**32, description="the noise's seed (not a training seed)")
    rules: dict[Label, NoiseRule] = Field(min_length=1, description="rule name -> rule; the name keys the record's "
                                                                    "test_sets entries noise:NAME")
    language: str | None = Field(None, description="noise this language's test text of a parallel corpus "
                                                   "(default: the whole test split)")

    @model_validator(mode="after")
    def _names_free(self):
        if CLEAN_CONDITIONAL_RULE in self.rules:
            raise ValueError(f"rules: {CLEAN_CONDITIONAL_RULE!r} names the clean conditional entry; call the rule otherwise")
        return self


CLEAN_CONDITIONAL_RULE = "clean-after-clean"  # test_sets["noise:clean-after-clean"]: the conditional form's baseline


class EvalSettings(Strict):
    window: int = Field(gt=1, description="bytes per evaluation (and training) window")
    max_windows: int | None = Field(None, gt=0, description="cap on windows scored per split")
    batch_windows: int = Field(16, gt=0)
    noise: NoiseSettings | None = Field(None, description="noised test sets scored besides the clean one")

    @model_serializer(mode="wrap")
    def _as_before_noise(self, dump):
        """Without noise, the settings dump as they did before it existed: config hashes, suite.json
        and records stay as they were."""
        dumped = dump(self)
        if self.noise is None:
            dumped.pop("noise", None)
        return dumped


class TrainerSettings(Strict):
    batch_windows: int = Field(16, gt=0, description="windows per optimizer step")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr of the cosine")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, gt=0, description="steps between loss-curve points")
    sampling: Literal["windows", "offsets"] = Field(
        "windows", description="training windows: the split cut into shuffled windows, or windows at random offsets")
    # off by default: it pays on fixed shapes (bytes, megabyte, patcher) and costs on data-dependent
    # chunk counts (hnet, spacebyte, byteflow recompile); README, "Speed"
    compile: bool = Field(False, description="compile the training forward with torch.compile")


class TrainerOverrides(Strict):
    """Per-model changes to the suite's trainer settings (recorded as overrides)."""

    batch_windows: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    sampling: Literal["windows", "offsets"] | None = None
    compile: bool | None = None


class ModelEntry(Strict):
    name: str = Field(pattern=LABEL_PATTERN, description="label used in run ids and tables")
    adapter: str
    config: dict = Field(default_factory=dict)
    trainer: TrainerOverrides = Field(default_factory=TrainerOverrides)


class Row(ModelEntry):
    """A model crossed with one level of each factor that names it (Suite.rows): its config is the
    model's with the levels' keys set, its name `model+factor=level` (one `+factor=level` per factor)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+(\+[A-Za-z0-9_.-]+=[A-Za-z0-9_.-]+)+$")
    factors: dict[str, str] = Field(description="factor -> level")


class Factor(Strict):
    """A choice the suite crosses with models (README, "Factors"): each level sets config keys of every
    model the factor names, so the report can compare each level with the base level, seed by seed."""

    models: list[Label] | None = Field(None, min_length=1, description="the models it crosses; default: every model "
                                                                       "whose adapter's config has every key the levels set")
    levels: dict[Label, dict] = Field(min_length=2, description="level -> the config keys it sets (replacing the "
                                                                 "model's own; {} keeps the model's config)")
    base: Label | None = Field(None, description="the level the others are compared with; default: the first")

    @model_validator(mode="after")
    def _base_is_a_level(self):
        if self.base is not None and self.base not in self.levels:
            raise ValueError(f"base: {self.base!r} is not one of the levels ({', '.join(self.levels)})")
        return self

    @property
    def base_level(self) -> str:
        return self.base if self.base is not None else next(iter(self.levels))

    @property
    def keys(self) -> set[str]:
        """The config keys its levels set."""
        return {key for level in self.levels.values() for key in level}


class InferenceScaling(Strict):
    """Matched inference cost that grows with compute: at budget C every model is sized to
    flops_per_byte x (C / at_budget) ^ exponent forward FLOPs per byte (harness.run.sizing),
    so all models of a rung share its inference cost and training bytes, and grow with C."""

    flops_per_byte: float = Field(gt=0, description="forward FLOPs per byte at the budget `at_budget`")
    at_budget: float = Field(gt=0, description="the training FLOPs where the target is `flops_per_byte`")
    exponent: float = Field(ge=0, le=1, description="how the target grows with the budget (0.5: parameters and "
                                                    "training bytes both grow as the square root of compute)")

    def target(self, budget: float) -> float:
        return self.flops_per_byte * (budget / self.at_budget) ** self.exponent

    def describe(self) -> str:
        return f"{self.flops_per_byte:.3g} x (C / {self.at_budget:.3g})^{self.exponent:g}"


class SizingSettings(Strict):
    """How matched-inference-cost sizing grows a model (harness.run.sizing)."""

    widths: Literal["all", "main"] = Field(
        "all", description="all: every width of a model grows by one factor, keeping the configured ratios; main: "
                           "only the main width grows (the rule before every width grew, kept so that records made "
                           "with it stay reproducible)")


class TuneSettings(Strict):
    """Per-model learning-rate search on validation bpb (harness.orchestrate.tuning; README, "Tuning")."""

    budgets: list[Annotated[float, Field(gt=0)]] = Field(
        min_length=1, description="training FLOPs of each trial; a run uses the choice at the nearest (log) budget")
    seeds: list[int] = Field([0], min_length=1, description="trial seeds; a value is scored by its mean val bpb")
    lr: list[Annotated[float, Field(gt=0)]] = Field(
        [1e-3, 3e-3, 1e-2], min_length=2, description="starting grid of peak learning rates")
    confirm_seeds: list[int] = Field(
        [], description="extra seeds for the best `confirm_top` values of the search, which then compete on their "
                        "mean val bpb over all their seeds (one seed's noise can pick an unstable lr)")
    confirm_top: int = Field(2, ge=2, description="how many of the search's best values the confirm_seeds rescore")
    factor: float = Field(3.0, gt=1, description="an optimum at an edge adds lr x factor (or / factor) beyond it")
    max_extensions: int = Field(2, ge=0, description="grid extensions per model and budget before giving up")
    grid: Literal["fixed", "centred"] = Field(
        "fixed", description="fixed: every tuning budget starts from `lr`; centred: each budget after the smallest "
                             "starts from the previous budget's choice and its two neighbours on the lr grid (extended "
                             "by `factor` past its ends), three trials where `lr` may hold more")
    confirm_within: float | None = Field(
        None, gt=0, description="confirm only the front-runners within this many bpb of the best on the search's "
                                "seeds (none: always the best `confirm_top`); a clear winner is not trained again")
    warmup_fraction: list[Annotated[float, Field(ge=0, lt=1)]] | None = Field(
        None, min_length=1, description="optional: also search these warmup fractions (crossed with lr)")
    batch_windows: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, min_length=1, description="optional: also search these batch sizes (crossed with lr)")

    @model_validator(mode="after")
    def _confirm_seeds_are_new(self):
        if set(self.confirm_seeds) & set(self.seeds) or len(set(self.confirm_seeds)) < len(self.confirm_seeds):
            raise ValueError("confirm_seeds must be distinct and not among seeds")
        return self

    def recorded(self) -> dict:
        """The settings as tuning.json keeps them; the search options added later are left out at
        their defaults, so a tuning.json written before them still matches its suite."""
        return self.model_dump(mode="json", exclude=_unset(self, grid="fixed", confirm_within=None))


class Holdout(Strict):
    """A rung beyond the ladder for some rows, left out of the scaling fits: the report predicts it
    from each form fitted to every ladder rung and says by how much each missed (docs/study.md,
    "Held-out rung")."""

    budget: float = Field(gt=0, description="training FLOPs of the held-out rung; above every budget of the ladder")
    rows: list[str] = Field(min_length=1, description="the rows that run it, by name (model, or model+factor=level)")
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field([0, 1], min_length=1, description="its seeds")
    tune_budget: float | None = Field(
        None, gt=0, description="tune these rows for the held-out rung at this budget (with the suite's tune: "
                                "settings; used by the held-out runs only); none: the nearest of the suite's "
                                "tuning budgets")


class ExecutorSettings(Strict):
    """Where a suite's runs go (harness.orchestrate.dispatch; README, "Scale-out"): as jobs through submitit,
    on this machine or on a Slurm cluster. Not part of any run's config hash: it changes where a
    run trains, not its result. The `harness run` options override these."""

    kind: Literal["local", "slurm"] = Field("local", description="local: worker processes on this machine; "
                                                                 "slurm: one Slurm job per run")
    workers: int | None = Field(None, gt=0, description="runs at a time; default: local, the GPUs / gpus_per_run "
                                                         "(1 on a CPU machine); slurm, no cap")
    gpus_per_run: int | None = Field(None, ge=0, description="GPUs per run, one DDP process each; default 1 where "
                                                             "runs go to GPUs (slurm, or a local machine with CUDA), else 0")
    partition: str | None = Field(None, description="Slurm partition")
    account: str | None = Field(None, description="Slurm account")
    qos: str | None = Field(None, description="Slurm quality of service")
    time_min: int = Field(240, gt=0, description="Slurm time limit per job, minutes (a run that outlasts it is "
                                                 "requeued and resumes)")
    cpus_per_task: int | None = Field(None, gt=0, description="Slurm CPUs per process of a run (one process per GPU)")
    mem_gb: float | None = Field(None, gt=0, description="Slurm memory per run, GB")

    @model_validator(mode="after")
    def _slurm_settings_need_slurm(self):
        if self.kind == "local":
            for key in ("partition", "account", "qos", "cpus_per_task", "mem_gb"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is a Slurm setting; the executor is local (kind: slurm sends jobs to Slurm)")
        return self


class ReferenceSettings(Strict):
    """How the reference compressors are primed (harness.run.references; README, "Reference rows")."""

    prime_bytes: int = Field(gt=0, description="prime each compressor with the last prime_bytes bytes of the training "
                                               "split (those nearest the test split) instead of all of it: coding a "
                                               "window after a split of many GB would take days")


class Suite(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="the results folder's name: not . or ..")
    version: int = Field(SUITE_FORMAT_VERSION, description="suite format version")
    description: str = ""
    corpus: Annotated[Union[Corpus, list[Corpus]], Field(
        union_mode="left_to_right", description="one corpus, or a list: every run is repeated on each")]
    split: SplitSizes
    eval: EvalSettings
    budgets: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="training FLOPs per run")
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field([0], min_length=1)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    inference_flops_per_byte: float | None = Field(
        None, gt=0, description="matched inference cost: size every model to this many forward FLOPs per byte "
                                "(within 5%) by its widths, then depth (harness.run.sizing); none keeps configured sizes")
    inference_scaling: InferenceScaling | None = Field(
        None, description="matched inference cost per budget: size every model at budget C to "
                          "flops_per_byte x (C / at_budget) ^ exponent; not with inference_flops_per_byte")
    sizing: SizingSettings = Field(default_factory=SizingSettings, description="how sizing grows a model's widths")
    count_auxiliary_flops: bool = Field(
        True, description="charge auxiliary models (e.g. BLT's entropy model) to the budget; the BLT paper does not")
    max_epochs: float | None = Field(
        None, gt=0, description="cap on epochs over the training split: a run whose budget would repeat the data more "
                                "often stops there, short of its budget (its record says so); none: the budget decides")
    models: list[ModelEntry] = Field(min_length=1)
    factors: dict[Label, Factor] | None = Field(
        None, description="choices crossed with the models they name: every such model becomes one row per "
                          "level, named model+factor=level (Suite.rows)")
    tune: TuneSettings | None = Field(None, description="choose each model's trainer settings on validation first")
    holdout: Holdout | None = Field(None, description="a rung beyond the ladder for some rows, held out of the fits")
    executor: ExecutorSettings | None = Field(None, description="run the suite's runs as jobs (harness.orchestrate.dispatch)")
    references: ReferenceSettings | None = Field(
        None, description="cap on the bytes the reference compressors are primed with; none: the whole training split")
    _source: str | None = PrivateAttr(None)  # the suite file, for errors found after loading

    @model_validator(mode="after")
    def _unique_names(self):
        if self.inference_flops_per_byte is not None and self.inference_scaling is not None:
            raise ValueError("inference_scaling: give either a fixed inference_flops_per_byte or a scaling rule, not both")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        for name, factor in (self.factors or {}).items():
            unknown = [m for m in factor.models or [] if m not in names]
            if unknown:
                raise ValueError(f"factors.{name}.models: {', '.join(unknown)} not among the models")
        labels = [c.label for c in self.corpora]
        if not labels:
            raise ValueError("corpus: the list is empty")
        if len(set(labels)) != len(labels):
            raise ValueError(f"corpus: two corpora share the label {max(labels, key=labels.count)!r} (run ids need distinct ones)")
        if self.references is not None and self.references.prime_bytes > self.split.train_bytes:
            raise ValueError(f"references.prime_bytes: {self.references.prime_bytes} bytes is more than the training "
                             f"split holds (split.train_bytes {self.split.train_bytes}); leave it out to prime with "
                             "the whole split")
        if self.eval.noise is not None and min(self.split.test_bytes // self.eval.window,
                                                  self.eval.max_windows or 2) < 2:
            raise ValueError("eval.noise: the conditional form needs two test windows or more (its first window "
                             "has no noised context before it)")
        language = self.eval.noise.language if self.eval.noise is not None else None
        if language is not None and not all(language in getattr(c, "languages", ()) for c in self.corpora):
            raise ValueError(f"eval.noise.language: {language!r} is not a language of every corpus (a parallel "
                             "corpus's languages)")
        if self.holdout is not None:
            self._check_holdout(self.holdout)
        for split in ("val", "test"):
            size = getattr(self.split, f"{split}_bytes")
            if self.eval.window > size:
                raise ValueError(f"eval.window: {self.eval.window} bytes is longer than the {split} split "
                                 f"(split.{split}_bytes {size}); it would hold no window to score")
        return self

    def _check_holdout(self, holdout: Holdout) -> None:
        if holdout.budget <= max(self.budgets):
            raise ValueError(f"holdout.budget: {holdout.budget:.3g} is not beyond the ladder (its top budget is "
                             f"{max(self.budgets):.3g})")
        names = [row.name for row in self.rows]
        unknown = [name for name in holdout.rows if name not in names]
        if unknown:
            raise ValueError(f"holdout.rows: {', '.join(unknown)} not among the rows ({', '.join(names)})")
        if holdout.tune_budget is not None and self.tune is None:
            raise ValueError("holdout.tune_budget: the suite has no tune: settings to tune with")

    @property
    def source(self) -> str:
        """The suite file, or the suite's name when it was not loaded from one."""
        return self._source or f"suite {self.name!r}"

    def inference_target(self, budget: float) -> float | None:
        """Forward FLOPs per byte that every model is sized to at this budget; None keeps configured sizes."""
        if self.inference_scaling is not None:
            return self.inference_scaling.target(budget)
        return self.inference_flops_per_byte

    def factor_models(self, name: str) -> list[str]:
        """The models factor `name` crosses: those it names, else every model whose adapter's config
        has every key its levels set."""
        factor = self.factors[name]
        if factor.models is not None:
            return factor.models
        from harness.api import registry  # only a factor that names no models needs the adapters

        return [m.name for m in self.models if factor.keys <= set(registry.get(m.adapter).Config.model_fields)]

    @property
    def rows(self) -> list[ModelEntry]:
        """The models crossed with the factors, in the suite's order: a model that factors cross is one
        Row per combination of their levels (in the order they are declared), each other model is
        itself. A level's keys replace the model's (a nested mapping whole)."""
        crossed = {name: self.factor_models(name) for name in self.factors or {}}
        rows = []
        for entry in self.models:
            factors = [name for name, models in crossed.items() if entry.name in models]
            if not factors:
                rows.append(entry)
                continue
            for levels in itertools.product(*(self.factors[name].levels for name in factors)):
                config = dict(entry.config)
                for name, level in zip(factors, levels):
                    config.update(self.factors[name].levels[level])
                rows.append(Row(name=entry.name + "".join(f"+{f}={level}" for f, level in zip(factors, levels)),
                                adapter=entry.adapter, config=config, trainer=entry.trainer,
                                factors=dict(zip(factors, levels))))
        return rows

    @property
    def corpora(self) -> list[Corpus]:
        return list(self.corpus) if isinstance(self.corpus, list) else [self.corpus]

    def corpus_named(self, label: str | None) -> Corpus:
        """The corpus with this label; None names the only corpus of a one-corpus suite."""
        labels = [c.label for c in self.corpora]
        if label is None and len(labels) == 1:
            return self.corpora[0]
        if label not in labels:
            raise HarnessError(f"suite {self.name!r} has corpora {', '.join(labels)}; name one of them"
                               + (f" (not {label!r})" if label is not None else ""))
        return self.corpora[labels.index(label)]


class Run(BaseModel):
    """One (model, budget, seed) of a suite, with everything resolved."""

    suite: str
    corpus: Corpus
    model: ModelEntry
    budget: float
    seed: int
    trainer: TrainerSettings
    name_corpus: bool = Field(False, description="put the corpus label in the run id (suites with several corpora)")
    tuning: dict | None = Field(None, description="which tuning trials chose the trainer settings (harness.orchestrate.tuning)")
    held_out: bool = Field(False, description="a run of the held-out rung (Suite.holdout): not fitted, predicted")

    @property
    def run_id(self) -> str:
        prefix = f"{self.corpus.label}__" if self.name_corpus else ""
        return f"{prefix}{self.model.name}__{budget_label(self.budget)}__s{self.seed}"

    def config_hash(self, suite: Suite) -> str:
        """Hash of everything that determines the run's result."""
        payload = {
            "corpus": self.corpus.model_dump(exclude={"label"}),  # the label names runs, it does not change them
            "split": suite.split.model_dump(),
            "eval": suite.eval.model_dump(),
            "model": _hashed_as_before_renames(self.model.model_dump(exclude={"trainer": _unset(
                self.model.trainer, compile=None, sampling=None)})),
            "budget": self.budget,
            "seed": self.seed,
            "trainer": self.trainer.model_dump(exclude=_unset(self.trainer, compile=False, sampling="windows")),
            "count_auxiliary_flops": suite.count_auxiliary_flops,
        }
        target = suite.inference_target(self.budget)  # the run's own target, fixed or from the scaling rule
        if target is not None:  # absent otherwise, so older hashes still match
            payload["inference_flops_per_byte"] = target
            if suite.sizing.widths != "main":  # older records were sized by the main width alone
                payload["sizing_widths"] = suite.sizing.widths
        if suite.max_epochs is not None:  # likewise
            payload["max_epochs"] = suite.max_epochs
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _unset(settings: BaseModel, **defaults) -> set[str]:
    """The settings added after config hashes were defined that still hold the value every older run
    had: left out of the hash, so older records still match their runs."""
    return {key for key, value in defaults.items() if getattr(settings, key) == value}


def _hashed_as_before_renames(value):
    """Config keys under the names they had when config hashes were defined (`attn_window` was
    `window`), so that records made before a rename still match their runs."""
    if isinstance(value, dict):
        return {("window" if k == "attn_window" else k): _hashed_as_before_renames(v) for k, v in value.items()}
    return value


def budget_label(budget: float) -> str:
    """A budget in run ids: C1.00e11 for 1e11."""
    return f"C{budget:.2e}".replace("+", "")


def expand(suite: Suite) -> list[Run]:
    runs = []
    for entry in suite.rows:
        overrides = entry.trainer.model_dump(exclude_none=True)
        trainer = suite.trainer.model_copy(update=overrides)
        for corpus in suite.corpora:
            for budget in suite.budgets:
                for seed in suite.seeds:
                    runs.append(Run(suite=suite.name, corpus=corpus, model=entry, budget=budget, seed=seed,
                                    trainer=trainer, name_corpus=len(suite.corpora) > 1))
            if suite.holdout is not None and entry.name in suite.holdout.rows:
                runs += [Run(suite=suite.name, corpus=corpus, model=entry, budget=suite.holdout.budget, seed=seed,
                             trainer=trainer, name_corpus=len(suite.corpora) > 1, held_out=True)
                         for seed in suite.holdout.seeds]
    return runs


def load_corpus(suite: Suite, label: str | None = None) -> data.Splits:
    """The splits of the suite's corpus with this label (None: its only corpus). Errors name the
    suite file and the key, e.g. `suites/x.yaml: corpus.files: no file matches 'data/*.txt'`."""
    c, s = suite.corpus_named(label), suite.split
    key = f"corpus[{suite.corpora.index(c)}]" if isinstance(suite.corpus, list) else "corpus"
    need = s.train_bytes + s.val_bytes + s.test_bytes
    try:
        if isinstance(c, EmbeddedCorpus):
            name, raw = c.embedded, data.embedded_corpus(c.embedded, need)
        elif isinstance(c, FilesCorpus):
            name, raw = f"files:{c.files}", data.files_corpus(c.files, c.field, need)
        elif isinstance(c, HfCorpus):
            name, raw = data.hf_corpus(c.hf, c.config, c.split, c.revision, c.field, need)
        elif isinstance(c, ParallelCorpus):
            return parallel.parallel_corpus(c.parallel, c.languages, c.weights, c.val_share, c.test_share,
                                            c.split_seed, {"train": s.train_bytes, "val": s.val_bytes,
                                                           "test": s.test_bytes})
        elif isinstance(c, PresetCorpus):
            preset = data.PRESETS[c.preset]
            name, raw = c.preset, data.url_corpus(preset["url"], preset["sha256"], preset["member"], Path(c.cache_dir), need)
        else:
            name, raw = f"url:{c.url}", data.url_corpus(c.url, c.sha256, c.member, Path(c.cache_dir), need)
    except data.CorpusError as e:
        where = "split" if e.key == "split" else f"{key}.{'preset' if isinstance(c, PresetCorpus) else e.key}"
        raise HarnessError(f"{suite.source}: {where}: {e}") from None
    try:
        return data.split(name, raw, s.train_bytes, s.val_bytes, s.test_bytes)
    except HarnessError as e:
        raise HarnessError(f"{suite.source}: split: {e}") from None
