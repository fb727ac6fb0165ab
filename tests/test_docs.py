"""The Python examples of README.md and docs/hub.md run as written.

The rule: every ```python block of those pages runs, in page order, each in a fresh namespace, in a
temporary working directory that holds what a reader has after `bash scripts/demo.sh` in a checkout:

- `recipes/assets/tiny_vit_letters`, the demo's backbone (the shipped folder);
- `outputs/demo_digits/task_0` ... `task_4`, a run of the demo's shape (that backbone, 5 tasks of 2
  classes), trained here for one epoch on tiny synthetic images so that it takes seconds;
- `some_image.jpg`, an image to classify.

A block that needs the network (a Hub model, dataset or repo, an upload) says so in the HTML comment
on the line before it, `<!-- needs: hub -->`; it is compiled, not run. Any other `needs:` value fails
the test, so a marker cannot hide a block that is merely broken. A block that raises fails the test,
naming the page and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_image_folder
from PIL import Image

BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*needs:\s*(\S+)\s*-->")
KNOWN_NEEDS = {"hub"}


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, source, what it needs) for each ```python block of a page."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


def test_blocks_and_markers_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- needs: hub -->\n```python\ny = 2\n```\n")
    assert python_blocks(page) == [(3, "x = 1\n", None), (8, "y = 2\n", "hub")]


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory):
    """A working directory as a reader's after the demo: backbone, a finished run, an image."""
    from slca_peft import (
        ContinualLearner,
        EvalTransform,
        ImageTransformConfig,
        SLCAConfig,
        SLCAModel,
        TaskSequence,
        TrainTransform,
    )
    from slca_peft.continual.steps import ReportStep

    root = tmp_path_factory.mktemp("reader")
    (root / "recipes").mkdir()
    (root / "recipes" / "assets").symlink_to(ROOT / "recipes" / "assets", target_is_directory=True)
    data = root.parent / f"{root.name}-data"
    train = write_image_folder(data / "train", num_classes=10, per_class=2, seed=1)
    test = write_image_folder(data / "test", num_classes=10, per_class=1, seed=2)
    args = SLCAConfig(output_dir=str(root / "outputs" / "demo_digits"), use_cpu=True, num_train_epochs=1,
                      per_device_train_batch_size=8, learning_rate=0.05, seed=0, disable_tqdm=True,
                      report_to="none", ca_epochs=1, ca_samples_per_class=4, ca_batch_size=32, init_cls=2, increment=2,
                      log_level="warning")
    tasks = TaskSequence.from_image_folders(train, test, init_cls=2, increment=2, seed=1993)
    model = SLCAModel.from_backbone(str(ROOT / "recipes" / "assets" / "tiny_vit_letters"), args)
    tc = ImageTransformConfig.from_model_config(model.config)
    learner = ContinualLearner(model, args, tasks, train_transform=TrainTransform(tc), eval_transform=EvalTransform(tc))
    learner.remove_callback(ReportStep)  # plots and metrics.json: no example reads them
    learner.run()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "some_image.jpg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/hub.md"])
def test_the_python_examples_run_as_written(page, reader_dir, monkeypatch):
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python block: the pattern no longer finds them"
    monkeypatch.chdir(reader_dir)
    for line, source, needs in blocks:
        assert needs in KNOWN_NEEDS | {None}, f"{page}:{line}: unknown marker needs: {needs} (known: {KNOWN_NEEDS})"
        code = compile(source, f"{page}:{line}", "exec")
        if needs:
            continue
        try:
            exec(code, {"__name__": "__docs__"})
        except Exception as error:
            raise AssertionError(f"{page}:{line}: the example raised {type(error).__name__}: {error}") from error
    if page == "docs/hub.md":
        assert sum(needs is None for *_, needs in blocks) >= 4, "most of hub.md's examples run offline"


def test_the_api_table_of_docs_index_lists_the_package_s_public_names():
    import slca_peft

    text = (ROOT / "docs" / "index.md").read_text().split("## API overview", 1)[1].split("Helpers in submodules", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    assert listed == set(slca_peft.__all__) | {"__version__"}


def test_every_test_the_docs_name_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = [page.read_text() for page in pages]
    # Test files mirror the package: tests/<subpackage>/test_x.py, a few about the whole repository at the top.
    named = {m for text in texts for m in re.findall(r"tests/(?:\w+/)?test_\w+\.py::\w+", text)}
    assert len(named) > 50, "the pattern no longer finds docs/reliability.md's pointers"
    files = {m for text in texts for m in re.findall(r"tests/(?:\w+/)?test_\w+\.py", text)}
    gone = [f for f in sorted(files) if not (ROOT / f).is_file()]
    assert not gone, f"docs name test files that do not exist: {gone}"
    missing = [n for n in sorted(named) if not re.search(
        rf"^(async )?def {n.split('::')[1]}\(", (ROOT / n.split("::")[0]).read_text(), re.MULTILINE)]
    assert not missing, f"docs name tests that do not exist: {missing}"
