"""The package's layout holds: the core imports no tooling, no import cycle anywhere, the API class loads
only the core, scripts stay thin and functions short. `python tests/test_layout.py` prints the numbers.

Imports are read from the source (function-level ones included), so a lazy import cannot hide a cycle.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stage_min"
# the model a reader opens first (docs/architecture.md): nothing here may import the tooling folders
CORE = {f"stage_min.{name}" for name in ("model", "delay", "stage", "generate", "text", "codec", "pipeline", "songs")}
TOOLING = ("io", "train", "eval", "toy", "app", "cli")
SCRIPTS = ("sample.py", "train.py", "evaluate.py", "bench.py", "app.py")
LIMITS = {"core_lines": 1100, "api_closure_lines": 2000, "sample_py_lines": 200, "function_lines": 80}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """stage_min modules that `name` imports anywhere in its file (`from .x import y` may name a module y)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict) -> list[list[str]]:
    """Every import cycle found by a depth-first walk (each as the path that closes it)."""
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def loaded_by(statement: str) -> list[str]:
    """The stage_min modules a fresh interpreter holds after running `statement`."""
    code = f"{statement}; import sys; print('\\n'.join(m for m in sys.modules if m.startswith('stage_min')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def lines(module_names) -> int:
    known = modules()
    return sum(len(known[m].read_text().splitlines()) for m in module_names if m in known)


def longest_functions(n: int = 3) -> list[tuple[int, str]]:
    files = [p for p in PACKAGE.rglob("*.py")] + [ROOT / s for s in SCRIPTS]
    sizes = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_core_imports_no_tooling():
    graph = import_graph()
    for name in CORE:
        assert graph[name] <= CORE | {"stage_min"}, f"{name} imports {sorted(graph[name] - CORE)}"


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    known = {"stage_min.x": Path("x"), "stage_min.y": Path("y")}
    source = ROOT / "tests" / "_layout_probe.py"
    try:  # a function-level import counts like any other
        source.write_text("def f():\n    from .y import thing\n")
        assert imports("stage_min.x", source, known) == {"stage_min.y"}
    finally:
        source.unlink()


def test_api_class_loads_the_core_only():
    loaded = loaded_by("from stage_min.pipeline import MusicGen")
    assert not [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in TOOLING], loaded
    assert lines(loaded) <= LIMITS["api_closure_lines"]


def test_sizes():
    assert lines(CORE) <= LIMITS["core_lines"]
    assert len((ROOT / "sample.py").read_text().splitlines()) <= LIMITS["sample_py_lines"]
    (size, where), = longest_functions(1)
    assert size <= LIMITS["function_lines"], where


def test_readme_reading_path_names_the_core_with_its_sizes():
    """README's "Reading the code" table lists every core file, in order, with its line count (within 10)."""
    import re

    rows = re.findall(r"^\| \[stage_min/(\w+)\.py\]\(stage_min/\w+\.py\) \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert {f"stage_min.{name}" for name, _ in rows} == CORE
    for name, count in rows:
        assert abs(len((PACKAGE / f"{name}.py").read_text().splitlines()) - int(count)) <= 10, name


def test_nothing_cites_a_file_outside_the_repository():
    """Code, tests and docs cite the project's own files (docs/original.md holds the original's facts)."""
    outside = ("REFERENCE" + ".md", "../" + "shared/", "shared/" + "seeds")  # split: this file cites none either
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: the tracked files are unknown")
    citing = [f for f in tracked if f.endswith((".py", ".md", ".toml", ".txt", ".json")) and (ROOT / f).is_file()
              and any(o in (ROOT / f).read_text(errors="replace") for o in outside)]
    assert citing == []


def main():
    graph = import_graph()
    api = loaded_by("from stage_min.pipeline import MusicGen")
    loader = loaded_by("from stage_min.io.pretrained import from_pretrained")
    print(f"modules: {len(graph)} ({len(CORE)} core, {lines(CORE)} lines)")
    print(f"import cycles: {len(cycles(graph))}")
    print(f"core modules importing tooling: {sum(bool(graph[m] - CORE - {'stage_min'}) for m in CORE)}")
    print(f"import closure of stage_min.pipeline.MusicGen: {len(api)} modules, {lines(api)} lines")
    print(f"import closure of stage_min.io.pretrained.from_pretrained: {len(loader)} modules, {lines(loader)} lines")
    print(f"sample.py: {len((ROOT / 'sample.py').read_text().splitlines())} lines")
    print("longest functions: " + ", ".join(f"{where} {size}" for size, where in longest_functions()))
    print(f"limits: {LIMITS}")


if __name__ == "__main__":
    main()
