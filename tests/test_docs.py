"""The docs say only what the repository has: the README stays short, every link reaches a file
(and heading) that exists, and every repository path or module that a doc, or a docstring, comment
or other string of the code, names exists: a file that moves takes its pointers with it or fails here."""

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted(p for folder in ("harness", "baselines", "byteflow") for p in (ROOT / folder).rglob("*.py"))

PATH = re.compile(r"(?<![\w./~$-])((?:harness|baselines|byteflow|suites|results|docs|tests)/[\w./*{}<>-]*)")
MODULE = re.compile(r"(?<![\w./-])((?:harness|baselines|byteflow)(?:\.[A-Za-z_]\w*)+)")
NOT_MODULES = {"harness.adapters"}  # the entry-point group adapters register under (pyproject.toml)
OUTPUT_OPTIONS = {"--out", "-o", "--output", "--results", "--tensorboard"}  # what follows is written, not read
# RUN_ID, SUITE, *.json, {name}, suites/x.yaml: a placeholder; the path is checked up to it
PLACEHOLDER = re.compile(r"[A-Z]{2,}|[*{<]|\.\.\.|^[a-z](\.\w+)?$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`]+)`", re.S)


@cache
def _suite_names() -> set[str]:
    return {yaml.safe_load(p.read_text())["name"] for p in (ROOT / "suites").glob("*.yaml")}


def path_problem(path: str) -> str | None:
    """None when `path` (relative to the repository root) names something the repository has."""
    path = path.rstrip(".,;:)'\"")
    if (ROOT / path).exists():
        return None
    parts = path.split("/")
    if parts[0] == "results" and len(parts) > 1 and parts[1] in _suite_names() and not (ROOT / "results" / parts[1]).exists():
        return None  # the output of a suite whose results are not committed (results/smoke/...)
    cut = next((i for i, part in enumerate(parts) if PLACEHOLDER.search(part)), None)
    if cut is not None:
        prefix = "/".join(parts[:cut])
        return None if (ROOT / prefix).is_dir() else f"{prefix}/ does not exist"
    if module_problem(path.replace("/", ".")) is None:
        return None  # a name in a module, written as a path: baselines/patching.space_starts
    return f"{path} does not exist"


@cache
def _top_level_names(module: Path) -> dict[str, ast.AST]:
    tree = ast.parse(module.read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0]: node for alias in node.names}
    return names


def module_problem(name: str) -> str | None:
    """None when `name` is a module of this repository, or a module and a name defined in it
    (`harness.api.Adapter`, `harness.modeling.flops.training_steps`)."""
    if name in NOT_MODULES:
        return None
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        module = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
        if module is None:
            continue
        rest = parts[n:]
        if not rest:
            return None
        defined = _top_level_names(module).get(rest[0])
        if defined is None:
            return f"{name}: {module.relative_to(ROOT)} defines no {rest[0]}"
        if len(rest) > 1 and isinstance(defined, ast.ClassDef):
            members = {getattr(node, "name", None) for node in defined.body} | {
                t.id for node in defined.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
            if rest[1] not in members:
                return f"{name}: {rest[0]} has no {rest[1]}"
        return None
    return f"{name} is not a module of this repository"


def pointer_problems(text: str, skip_outputs: bool = False) -> list[str]:
    """What `text` names that the repository does not have: paths and dotted module names."""
    problems = []
    words = text.split()
    for i, word in enumerate(words):
        if skip_outputs and i and words[i - 1] in OUTPUT_OPTIONS:
            continue
        problems += filter(None, (path_problem(p) for p in PATH.findall(word)))
        problems += filter(None, (module_problem(m.rstrip(".")) for m in MODULE.findall(word)))
    return problems


def code_spans(markdown: str) -> list[str]:
    return [block or span for block, span in CODE.findall(markdown)]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: headings in lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", CODE.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines; the rest belongs in docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_reach_files_and_headings_that_exist(doc):
    text = doc.read_text()
    assert not re.search(r"https?://", text), f"{doc.name} points outside the repository"
    for link in LINK.findall(text):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link to {link}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in heading_anchors(path.read_text()), f"{doc.name}: link to {link}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_and_modules_named_in_docs_exist(doc):
    problems = [p for span in code_spans(doc.read_text()) for p in pointer_problems(span, skip_outputs=True)]
    assert not problems, f"{doc.name}: " + "; ".join(dict.fromkeys(problems))


def strings_and_comments(source: str) -> list[str]:
    """Docstrings, comments and every other string (help texts, field descriptions, messages)."""
    texts = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    texts += [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return texts


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_modules_named_in_strings_and_comments_exist(source):
    text = source.read_text()
    assert "DESIGN.md" not in text, f"{source.relative_to(ROOT)} cites DESIGN.md, which the repository does not have"
    problems = [p for doc in strings_and_comments(text) for p in pointer_problems(doc)]
    assert not problems, f"{source.relative_to(ROOT)}: " + "; ".join(dict.fromkeys(problems))


def test_the_checks_catch_stale_pointers():
    assert path_problem("harness/core/nowhere.py") and path_problem("suites/missing.yaml")
    assert module_problem("harness.sizing") and module_problem("harness.api.NoSuchAdapter")
    assert path_problem("harness/modeling/flops.py") is None and path_problem("results/SUITE/runs/RUN_ID/") is None
    assert path_problem("results/smoke/runs/bytes__C2.50e11__s0") is None  # the first command's output
    assert path_problem("results/nosuite/report.md") and path_problem("harness/nowhere/RUN_ID")
    assert module_problem("harness.modeling.flops.training_steps") is None and module_problem("harness.api.Adapter") is None
    assert pointer_problems("`harness bench x.yaml --out results/bench/new.json`", skip_outputs=True) == []
