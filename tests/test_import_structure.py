"""The package's import structure: every module imports on its own, the subpackages are layers (each
imports only from those below it), no two modules import each other (directly or around a circle, lazily
inside a function included), and no module imports another's private (`_name`) names. Imports under
`if TYPE_CHECKING:` only name types and are not counted."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slca_peft"
#: The subpackages, lowest first: each may import only from those before it (and from itself).
LAYERS = ["utils", "artifacts", "metrics", "sharing", "models", "data", "method", "export", "continual", "commands"]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of `package` (folders without __init__.py are data)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every import statement that runs (module level or inside a function), skipping TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> modules of the package it imports, and every `from .x import _private` found."""
    modules = module_files(package)
    root = package.name
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != root:
                    continue
                targets = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and sub not in modules:
                        private.append(f"{name}: from {source} import {alias.name}")
            for target in targets:
                while target and target not in modules:  # `import slca_peft.x.y` binds slca_peft.x.y's package chain
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_checks_find_a_circle_and_a_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import _hidden\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import T\n"
                                      "import pkg.a\n")
    (pkg / "d.py").write_text("from .sub import c\n")
    edges, private = import_graph(pkg)
    assert edges == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.sub.c"}}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert private == ["pkg.b: from pkg.sub.c import _hidden"]


@pytest.mark.parametrize("module", sorted(module_files(PACKAGE)))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_module_imports_in_a_circle_or_takes_private_names():
    edges, private = import_graph(PACKAGE)
    assert len(edges) > 30 and edges["slca_peft.continual.learner"]  # the walk saw the package
    assert cycles(edges) == []
    assert private == []


def test_the_file_layout_module_is_a_leaf():
    edges, _ = import_graph(PACKAGE)
    assert edges["slca_peft.artifacts.layout"] == set()


def layer_violations(edges: dict[str, set[str]], layers: list[str]) -> list[str]:
    """Every import of a module in subpackage A from subpackage B where B is not below A."""
    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in layers else None

    found = []
    for source, targets in sorted(edges.items()):
        here = layer(source)
        for target in sorted(targets):
            there = layer(target)
            if here and there and layers.index(there) > layers.index(here):
                found.append(f"{source} -> {target}")
            if here and "." not in target:  # the top-level package re-exports every layer
                found.append(f"{source} -> {target}")
    return found


def test_the_layer_check_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .high.b import thing\n")
    (pkg / "high" / "b.py").write_text("from ..low.a import thing\n")
    (pkg / "low" / "a.py").write_text("def f():\n    from ..high import b\nthing = 1\n")
    edges, _ = import_graph(pkg)
    assert layer_violations(edges, ["low", "high"]) == ["pkg.low.a -> pkg.high.b"]
    assert layer_violations(edges, ["high", "low"]) == ["pkg.high.b -> pkg.low.a"]


def test_the_subpackages_are_layers():
    edges, _ = import_graph(PACKAGE)
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert subpackages == sorted(LAYERS)
    assert layer_violations(edges, LAYERS) == []


def test_few_modules_stay_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py"]


def test_recipes_benchmarks_and_docs_import_only_the_package_or_a_subpackage():
    """The public API has levels: `slca_peft` and each subpackage's `__all__`; nothing outside the package
    reaches into a module (`from slca_peft.data.formats import ...`)."""
    root = PACKAGE.parent
    sources = [*root.glob("recipes/*.py"), *root.glob("benchmarks/*.py"), *root.glob("docs/*.md"), root / "README.md"]
    deep = re.compile(r"^\s*(?:from|import) (slca_peft\.[a-z_]+\.[a-z_.]+)", re.MULTILINE)
    found = [f"{path.relative_to(root)}: {m}" for path in sources for m in deep.findall(path.read_text())]
    assert found == []
    assert deep.findall("from slca_peft.data.formats import x\nfrom slca_peft.data import y\n") == [
        "slca_peft.data.formats"]


def test_the_top_level_holds_at_most_25_names_and_each_subpackage_declares_its_own():
    import slca_peft

    assert len(slca_peft.__all__) <= 25
    for sub in ("utils", "artifacts", "metrics", "sharing", "models", "data", "method", "export", "continual",
                "commands"):
        module = importlib.import_module(f"slca_peft.{sub}")
        assert module.__all__ and all(hasattr(module, name) for name in module.__all__), sub
