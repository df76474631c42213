"""The package's architecture, checked from its source: stages import downward only, and no two modules import each other.

Stages, lowest first: errors/devices/native (shared utilities) -> quant -> modules -> loading ->
data -> training -> evaluation -> export -> recipes -> cli. Every `import` statement counts, including those
inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nibbletune"
STAGES = ["(top)", "quant", "modules", "loading", "data", "training", "evaluation", "export", "recipes", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every nibbletune module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("nibbletune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nibbletune"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import tiny` imports a module
                if (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").is_file():
                    found.add(f"{target}.{alias.name}")
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "(top)"


GRAPH = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_stage():
    assert {_stage(module) for module in GRAPH} <= set(STAGES)


# The root is the API facade over all stages; `__main__` is `python -m nibbletune`, the CLI's entry point.
@pytest.mark.parametrize("module", sorted(set(GRAPH) - {"nibbletune", "nibbletune.__main__"}))
def test_imports_go_downward(module):
    rank = STAGES.index(_stage(module))
    upward = sorted(target for target in GRAPH[module]
                    if target in GRAPH and target != "nibbletune" and STAGES.index(_stage(target)) > rank)
    assert not upward, f"{module} (stage {_stage(module)}) imports a higher stage: {upward}"


def test_no_import_cycles():
    """No module reaches itself through imports (package __init__ re-exports aside)."""
    def edges(module: str) -> set[str]:
        return {t for t in GRAPH.get(module, ()) if t in GRAPH and not _is_parent_package(t, module)}

    def _cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in edges(node):
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    cycles = [cycle for module in GRAPH if (cycle := _cycle_from(module))]
    assert not cycles, f"import cycles, e.g. {' -> '.join(cycles[0])}"


def _is_parent_package(target: str, module: str) -> bool:
    """`from . import x` inside a package reaches its own __init__: not a dependency of the module's own code."""
    return module.startswith(target + ".")


def test_the_public_api_is_at_the_top_level():
    """Each name is what it says even after every stage was imported (a subpackage named like a
    function would replace it on the package the moment it is imported)."""
    import importlib

    import nibbletune

    for stage in STAGES[1:]:
        importlib.import_module(f"nibbletune.{stage}")

    for name in ("load_model", "apply_lora", "save_adapter", "load_adapter", "merge", "quantize", "train",
                 "TrainConfig", "QuantSettings", "LoraSettings", "quantize_checkpoint", "plan"):
        value = getattr(nibbletune, name)
        assert callable(value) and not isinstance(value, type(nibbletune)), f"nibbletune.{name} is {value!r}"
        assert value.__doc__, f"nibbletune.{name} has no docstring"
        assert name in nibbletune.__all__


def test_all_lists_every_lazy_export():
    import nibbletune

    assert set(nibbletune._EXPORTS) | {"NibbletuneError", "__version__"} == set(nibbletune.__all__)
