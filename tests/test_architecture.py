"""The package's shape: imports go one way (no cycle, hidden or not)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "etegrec"
# the command line and the package fronts that export run_stage: the ways in to the pipeline
COMMANDS = {"etegrec.training.run.cli", "etegrec.training"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every etegrec module ``name`` imports, at module level or inside a function (those count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from etegrec import signals` imports the module etegrec.signals
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package's __init__ re-exporting its own modules
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle_not_even_one_hidden_inside_a_function():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_check_finds_a_cycle_made_by_an_import_inside_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_only_the_command_line_imports_the_pipeline_so_no_stage_does():
    importers = {name for name, deps in _graph().items() if "etegrec.training.run.pipeline" in deps}
    assert importers <= COMMANDS, importers - COMMANDS


def test_models_and_data_know_nothing_of_the_bus_or_of_training():
    for name, deps in _graph().items():
        if name.startswith(("etegrec.models", "etegrec.data", "etegrec.forge.assign", "etegrec.metrics")):
            bad = {d for d in deps if d.startswith(("etegrec.signals", "etegrec.hooks", "etegrec.training"))}
            assert not bad, f"{name} imports {bad}"


def test_the_wandb_subscriber_module_is_under_200_lines():
    assert len((PACKAGE / "hooks" / "wandb.py").read_text(encoding="utf-8").splitlines()) < 200
