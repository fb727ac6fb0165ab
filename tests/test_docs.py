"""The code examples of README.md and docs/*.md run as written.

The rule: every ```python and ```bash block of those pages runs, in page order, in a temporary working
directory that holds what a reader has after the README's install step and `bash scripts/demo.sh`:

- `.venv`, the environment `scripts/setup.sh` installs (this test's own interpreter's), whose
  `bin/` is on PATH as after `source .venv/bin/activate`;
- `recipes/assets/tiny_vit_letters`, the demo's backbone (the shipped folder);
- `outputs/demo_digits/task_1` ... `task_5`, a run of the demo's shape (that backbone, 5 tasks of 2
  classes), trained here for one epoch on tiny synthetic images so that it takes seconds;
- `some_image.jpg`, an image to classify.

A python block runs in a fresh namespace, a bash block in `bash -e`. A block that cannot run here says
why in the HTML comment on the line before it, `<!-- needs: hub, gpu -->` (one or more of `NEEDS`); it
is compiled (`bash -n` for bash), not run. A block that reaches the network (a Hub model, dataset or
repo, an upload, a download) must say `hub` (`NETWORK` finds them), and any other `needs:` value fails
the test, so a marker cannot hide a block that is merely broken. A block that fails, fails the test,
naming the page and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, python_forked, write_image_folder
from PIL import Image

BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*needs:\s*([\w\s,-]+?)\s*-->")
#: Why a block is not run here, as its marker names it.
NEEDS = {
    "hub": "the network: a Hub model, dataset or repo, an upload, pip or git downloads",
    "gpu": "one or more CUDA GPUs",
    "long": "minutes to hours of training or benchmarking",
    "data": "files a reader brings: their own image folders, a finished run of the paper's setting, a checkpoint",
    "fragment": "not a whole program: flags to add, a synopsis with [OPTIONS] or <PLACEHOLDERS>, or code that "
                "goes on from names an earlier block or the text defines",
}
#: What reaches the network: a Hub id the docs use, a download, an upload.
NETWORK = re.compile(r"google/vit|\bme/|owner/name|load_dataset\(|push_to_hub|slca-peft push|git clone|pip install|"
                     r"--dataset cifar100|/hf\b")
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def code_blocks(page: Path) -> list[tuple[int, str, str, frozenset[str]]]:
    """(line, language, source, what it needs) for each ```python and ```bash block of a page."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        needs = frozenset(n.strip() for n in marker.group(1).split(",")) if marker else frozenset()
        blocks.append((line, match.group(1), match.group(2), needs))
    return blocks


def test_blocks_and_markers_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- needs: hub -->\n```python\ny = 2\n```\n\n"
                    "<!-- needs: gpu, long -->\n```bash\nnvidia-smi\n```\n\n```bash\nls\n```\n\n```yaml\na: 1\n```\n")
    assert code_blocks(page) == [(3, "python", "x = 1\n", frozenset()), (8, "python", "y = 2\n", {"hub"}),
                                 (13, "bash", "nvidia-smi\n", {"gpu", "long"}), (17, "bash", "ls\n", frozenset())]


@pytest.mark.parametrize("page", PAGES)
def test_every_block_that_cannot_run_here_says_why_and_every_network_block_says_hub(page):
    for line, language, source, needs in code_blocks(ROOT / page):
        assert needs <= set(NEEDS), f"{page}:{line}: unknown marker needs: {sorted(needs - set(NEEDS))} " \
                                    f"(known: {sorted(NEEDS)})"
        if NETWORK.search(source):
            assert "hub" in needs, f"{page}:{line}: this {language} block reaches the network; mark it " \
                                   "<!-- needs: hub -->"
        if language == "python":
            compile(source, f"{page}:{line}", "exec")
        else:
            checked = subprocess.run(["bash", "-n"], input=source, text=True, capture_output=True)
            assert checked.returncode == 0, f"{page}:{line}: not bash: {checked.stderr}"


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
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
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


def run_bash(source: str, where: Path) -> subprocess.CompletedProcess:
    """A bash block as a reader runs it after `source .venv/bin/activate`, offline."""
    venv = where / ".venv"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(["bash", "-e", "-c", source], cwd=where, env=env, text=True, capture_output=True,
                          timeout=300)


@pytest.mark.slow
# docs/hub.md calls PEFT itself (plain `PeftModel.from_pretrained`), outside the library's filter of that warning.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("page", PAGES)
def test_the_examples_run_as_written(page, reader_dir, monkeypatch):
    blocks = code_blocks(ROOT / page)
    monkeypatch.chdir(reader_dir)
    for line, language, source, needs in blocks:
        if needs:
            continue
        if language == "bash":
            ran = run_bash(source, reader_dir)
            assert ran.returncode == 0, f"{page}:{line}: the example failed ({ran.returncode}):\n{ran.stderr[-2000:]}"
            continue
        try:
            exec(compile(source, f"{page}:{line}", "exec"), {"__name__": "__docs__"})
        except Exception as error:
            raise AssertionError(f"{page}:{line}: the example raised {type(error).__name__}: {error}") from error
    if page == "docs/hub.md":
        assert sum(not needs for *_, needs in blocks) >= 4, "most of hub.md's examples run offline"
    if page == "docs/quickstart.md":  # the CLI as the install step leaves it, on the demo's checkpoints
        assert any(not needs and source.startswith(".venv/bin/slca-peft") for _, _, source, needs in blocks)


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


def test_the_readme_s_demo_figures_say_which_precision_and_cpu_produced_them():
    figures = re.compile(r"\d+\.\d+ ?%? / (Inc-Acc )?\d+\.\d+")
    paragraphs = [" ".join(p.split()) for p in (ROOT / "README.md").read_text().split("\n\n") if figures.search(p)]
    assert paragraphs, "the pattern no longer finds the README's demo figures"
    for paragraph in paragraphs:
        # Every figure sits in a sentence that names its precision and the CPU it was measured on.
        for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z(])", paragraph):
            if figures.search(sentence):
                assert re.search(r"\bfp32\b|\bbf16\b", sentence), sentence
                assert re.search(r"\bCPU\b", sentence) and re.search(r"any CPU|AVX512|EPYC|Xeon", sentence), sentence


def test_the_error_lines_docs_reliability_shows_are_what_the_cli_prints(tmp_path):
    """docs/reliability.md quotes the command line's error lines: a user error's, and argparse's own."""
    text = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    lines = []
    for value in ("0", "x"):  # the command as `slca-peft train ...` runs it, in a process of its own
        done = python_forked("import os; os.environ.pop('SLCA_PEFT_DEBUG', None)\n"
                             "from slca_peft.commands.cli import main; main()",
                             "train", "--ca_batch_size", value, "--output_dir", str(tmp_path / "out"))
        assert done.returncode == 2, done.stderr[-2000:]
        lines.append(done.stderr.strip().splitlines()[-1])
    user_error, parse_error = lines
    assert user_error.startswith("slca-peft: error: --ca_batch_size 0 is out of range")
    assert "`slca-peft: error: <problem and fix>`" in text
    assert f"`{parse_error}`" in text, parse_error
