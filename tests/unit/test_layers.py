"""The library only looks down: every module of pipeline/ and stages/ sits in one layer of
docs/design.md's "Layers" table and imports (at module level or inside a function) only modules of
its own layer or below; no import cycle; only the top layer imports the recipes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its source (a `from pkg import mod` counts
    as importing pkg.mod)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found - set(PACKAGES)  # the package roots are empty


def layers() -> dict[str, tuple[int, str]]:
    """module prefix -> (layer number, layer name), from docs/design.md's table."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    found = {}
    for number, layer, cells in re.findall(r"^\| (\d+) (\w[\w ]*?) \| (.+?) \|$", table, flags=re.M):
        for module in re.findall(r"`([\w.*]+)`", cells):
            found[module.removesuffix(".*")] = (int(number), layer)
    return found


def layer_of(name: str, table: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    short = name.removeprefix("pipeline.")
    for candidate in (short, name):
        parts = candidate.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in table:
                return table[".".join(parts[:n])]
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items() if name not in PACKAGES}


def test_every_module_has_a_layer():
    table = layers()
    assert len({n for n, _ in table.values()}) >= 5, "docs/design.md's Layers table did not parse"
    missing = [name for name in graph() if layer_of(name, table) is None]
    assert not missing, f"place these modules in docs/design.md's Layers table: {missing}"


def test_no_module_imports_a_layer_above_its_own():
    table = layers()
    upward = [f"{name} (layer {layer_of(name, table)}) imports {dep} (layer {layer_of(dep, table)})"
              for name, deps in graph().items() for dep in sorted(deps)
              if layer_of(dep, table)[0] > layer_of(name, table)[0]]
    assert not upward, "\n".join(upward)


def test_only_the_top_layer_imports_the_runner_and_the_recipes():
    table = layers()
    top = max(n for n, _ in table.values())
    wrong = [f"{name} imports {dep}" for name, deps in graph().items() for dep in deps
             if (dep.startswith("stages.") or dep == "pipeline.runner") and layer_of(name, table)[0] != top]
    assert not wrong, wrong


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == 1:
                return path + [name, dep]
            if dep not in state and (cycle := visit(dep, path + [name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_the_walk_sees_function_level_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from pipeline.runner import run_pipeline\n    import pipeline.log\n")
    assert imports("pipeline.x", source, modules()) == {"pipeline.runner", "pipeline.log"}
