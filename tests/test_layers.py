"""The floors of the house, checked on the import graph (every import, at module level or inside a
function): no cycle between modules, no arrow upward, and adapters see only the adapter door.

From the ground up: harness.errors and harness.storage (files and the cache); harness.modeling (shared nn blocks, FLOPs, windows); harness.api
(the adapter interface); harness.run (one run, plan to record); harness.analysis and
harness.orchestrate (side by side: neither imports the other); the lm-eval plugin; harness.commands;
harness.cli on top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"harness": 0, "harness.errors": 0, "harness.storage": 0, "harness.modeling": 1, "harness.api": 2, "harness.run": 3,
          "harness.analysis": 4, "harness.orchestrate": 4, "harness.lm_eval_plugin": 5, "harness.commands": 6,
          "harness.cli": 7}
ADAPTER_DOOR = ("harness.api", "harness.modeling", "harness.errors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules `path` imports (a `from package import module` counts as the module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in ("harness", "baselines", "byteflow")}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("harness", "baselines", "byteflow") for p in (ROOT / top).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def floor(module: str) -> tuple[str, int] | None:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, FLOORS[prefix]
    return None


def test_no_import_cycles():
    edges = graph()
    # a module importing its own package's __init__ is not a cycle of modules
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    assert cycles == []


def test_no_arrow_points_upward_or_sideways_between_floors():
    wrong = []
    for source, targets in graph().items():
        mine = floor(source)
        if mine is None:
            continue
        for target in targets:
            theirs = floor(target)
            if theirs is None or theirs[0] == mine[0] or target == "harness":
                continue
            if theirs[1] >= mine[1]:
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_adapters_import_only_the_adapter_door():
    wrong = [f"{source} -> {target}" for source, targets in graph().items()
             if source.split(".")[0] in ("baselines", "byteflow")
             for target in targets
             if target.startswith("harness") and not any(target == d or target.startswith(d + ".") for d in ADAPTER_DOOR)]
    assert wrong == []


def test_the_checks_see_a_planted_cycle_and_an_upward_arrow(tmp_path, monkeypatch):
    """The graph is real: a module that imported the runner from the run floor would be caught."""
    edges = graph()
    assert "harness.run.pipeline" in edges["harness.orchestrate.runner"]
    assert floor("harness.run.pipeline")[1] < floor("harness.orchestrate.runner")[1]
    assert "harness.api" in edges["baselines.bytes"]


def test_no_function_in_harness_is_longer_than_sixty_lines():
    """A function that grows past a screen gets split into named steps (report tables may be data)."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in (ROOT / "harness").rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
