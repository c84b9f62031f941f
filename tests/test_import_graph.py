"""The package's import graph (docs/architecture.md, "Import direction"): no import circle, no
import from `training/` up to `tasks/`, no library module importing `commands/`. Read from the
source with `ast` (every import statement, module-level or inside a function), nothing imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vimpac_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from P import M` counts as M when M is a
    module, else as P)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def strongly_connected_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of more than one module that import each other."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_checker_finds_a_circle_and_the_imports_it_must():
    """The graph is read right: known edges (a function-level one too) and a circle of three."""
    graph = import_graph()
    assert "vimpac_jax.tasks.registry" in graph["vimpac_jax.commands.train"]  # inside main()
    assert "vimpac_jax.training.train" in graph["vimpac_jax.commands.train"]
    assert "vimpac_jax.models.config" in graph["vimpac_jax.models.model"]  # `from vimpac_jax.models import config`
    assert strongly_connected_groups({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_circle():
    assert strongly_connected_groups(import_graph()) == []


def test_training_imports_nothing_from_tasks_and_the_library_nothing_from_commands():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if m.startswith("vimpac_jax.training") and d.startswith("vimpac_jax.tasks"))
    commands = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                      if d.startswith("vimpac_jax.commands") and not m.startswith("vimpac_jax.commands")
                      and m != "vimpac_jax.cli")
    assert upward == [] and commands == []
