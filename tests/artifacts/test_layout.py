"""Every file and folder name of a run directory, a checkpoint and an export is spelled in one module
(`slca_peft.artifacts.layout`); the rest of the package refers to its constants."""

from __future__ import annotations

import ast
from pathlib import Path

from slca_peft.artifacts import layout

PACKAGE = Path(layout.__file__).resolve().parents[1]


def layout_names() -> set[str]:
    names = {value for key, value in vars(layout).items() if key.isupper() and isinstance(value, str)}
    names |= {value for key, value in vars(layout).items() if key.isupper() and isinstance(value, tuple)
              for value in value if isinstance(value, str)}
    return names


def literal_uses(path: Path, names: set[str]) -> list[str]:
    """`file:line: 'name'` for each string constant in `path` (docstrings excluded) equal to a layout name."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in names:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_the_check_finds_a_name_spelled_outside_the_layout(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Writes metrics.json."""\nPATH = "metrics.json"\nOTHER = f"{1}" + "seeds.json"\n')
    assert [line.split(": ")[1] for line in literal_uses_rel(module)] == ["'metrics.json'", "'seeds.json'"]


def literal_uses_rel(module: Path) -> list[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, module.parent
    try:
        return literal_uses(module, layout_names())
    finally:
        PACKAGE = saved


def test_each_file_name_is_spelled_in_the_layout_module_only():
    names = layout_names()
    assert {"metrics.json", "seeds.json", "run_fingerprint.json", ".slca-manifest.json", ".slca-run.lock",
            "continual_state.json", "results.md", "task_", "seed_"} <= names
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != Path(layout.__file__).resolve():
            offenders += literal_uses(path, names)
    assert offenders == []


def test_folder_names_are_parsed_by_the_layout_alone():
    assert [layout.task_index(n) for n in ("task_1", "task_12", "task_0", "task_x", "task_١", "task_1b")] == \
        [0, 11, None, None, None, None]
    assert [layout.seed_index(n) for n in ("seed_3", "seed_-2", "seed_", "seeds", "seed_--3", "seed_-", "seed_3-")] == \
        [3, -2, None, None, None, None, None]
    written = layout.temporary_name("task_3", layout.TEMP_MARK, "a1b2")
    replaced = layout.temporary_name("task_3", layout.OLD_MARK, 1234)
    assert (written, replaced) == (".task_3.tmp-a1b2", ".task_3.old-1234")
    assert layout.temporary_target(written) == layout.temporary_target(replaced) == "task_3"
    assert layout.is_task_leftover(written) and layout.is_task_leftover(replaced)
    assert not layout.is_task_leftover(written, layout.OLD_MARK) and layout.is_task_leftover(written, layout.TEMP_MARK)
    assert layout.is_task_leftover(replaced, layout.OLD_MARK)
    for other in (".task_0.tmp-1", ".notes.tmp-1", "task_3.tmp-1", ".tmp-1", ".seed_1.old-2", ".task_3.bak-1"):
        assert not layout.is_task_leftover(other), other
