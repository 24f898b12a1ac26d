"""The house rules of the code base, checked on the source: dependencies run one way (``eval`` and
``benchmarks`` -> ``engine``'s public names; ``engine`` never imports ``eval``), there are no import cycles,
torch is imported by the encoders module only, and nothing hides an ImportError."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "eval")
TORCH_LIBS = {"torch", "open_clip", "timm", "torchvision"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for top in (*PACKAGES, "benchmarks"):
        for p in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(p)] = p
    return out


SOURCES = _sources()


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom refers to."""
    if not node.level:
        return node.module or ""
    is_pkg = SOURCES.get(mod, Path()).name == "__init__.py"
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the module, lazy (function-level) ones included. ``from
    pkg import sub`` counts as importing ``pkg.sub`` when ``sub`` is a module of the project."""
    tree = ast.parse(SOURCES[mod].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in SOURCES]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return out


def project_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod in SOURCES:
        deps = set()
        for name, _ in imports_of(mod):
            while name and name not in SOURCES:  # engine.rankers.clip.ClipRanker -> engine.rankers.clip
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def test_engine_never_imports_eval_or_benchmarks():
    bad = [(m, name, line) for m in SOURCES if m.startswith("engine")
           for name, line in imports_of(m) if name.split(".")[0] in ("eval", "benchmarks")]
    assert not bad, bad


def test_eval_and_benchmarks_use_only_public_engine_names():
    bad = []
    for m in SOURCES:
        if m.startswith("engine"):
            continue
        for name, line in imports_of(m):
            parts = name.split(".")
            if parts[0] == "engine" and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{SOURCES[m].relative_to(ROOT)}:{line} imports {name}")
    assert not bad, bad


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first search, as the cycle it closes."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    assert not find_cycles(project_graph())


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_only_the_encoders_module_imports_torch():
    bad = [(m, name) for m in SOURCES if m.startswith("engine") and m != "engine._encoders"
           for name, _ in imports_of(m) if name.split(".")[0] in TORCH_LIBS]
    assert not bad, bad


def test_no_silent_import_error_handlers():
    bad = []
    for _m, p in SOURCES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                if names & {"ImportError", "ModuleNotFoundError"} and all(isinstance(s, ast.Pass) for s in node.body):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
