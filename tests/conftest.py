"""Shared fixtures: tiny ViTs built from configs and small on-disk image data, never the network."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def make_learner(base_model_dir):
    """`make_learner(tasks, output_dir, callbacks=None, **config)`: a ContinualLearner on the tiny base model with
    test-sized settings (keywords override `SLCAConfig` fields) and mild, flip-free augmentation.

    `base_model` starts from another backbone folder; `resume_from` finishes the stream of a checkpoint
    (`ContinualLearner.from_checkpoint`); `continue_from` goes on from one with new classes
    (`ContinualLearner.from_pretrained`, with its `old_test` and `merge_existing_classes`). Session-scoped, so
    module-scoped fixtures can train with it too."""
    from slca_peft import ContinualLearner, EvalTransform, ImageTransformConfig, SLCAConfig, SLCAModel, TrainTransform

    def make(tasks, output_dir, callbacks=None, *, base_model=None, resume_from=None, continue_from=None,
             old_test=None, merge_existing_classes=False, **config):
        values = dict(output_dir=str(output_dir), use_cpu=True, num_train_epochs=4, per_device_train_batch_size=8,
                      learning_rate=0.05, ca_lr=0.01, seed=0, disable_tqdm=True, report_to="none",
                      ca_samples_per_class=128, ca_batch_size=32, ca_epochs=5)
        args = SLCAConfig(**{**values, **config})
        if resume_from is not None:
            learner = ContinualLearner.from_checkpoint(resume_from, args, tasks, callbacks=callbacks)
        elif continue_from is not None:
            learner = ContinualLearner.from_pretrained(continue_from, args, tasks, callbacks=callbacks,
                                                       old_test=old_test, merge_existing_classes=merge_existing_classes)
        else:
            model = SLCAModel.from_backbone(str(base_model or base_model_dir), args)
            learner = ContinualLearner(model, args, tasks, callbacks=callbacks)
        tc = ImageTransformConfig.from_model_config(learner.model.config)
        learner.set_transforms(TrainTransform(tc, scale=(0.8, 1.0), flip_p=0.0), EvalTransform(tc))
        return learner

    return make


def trained_model(base_model_dir):
    """A model with two tasks whose every trainable tensor and head differs from its initial value."""
    from slca_peft import SLCAModel

    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.grow(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or "heads" in name:
                param.add_(0.05 * torch.randn_like(param))
        model.classifier.scales[0] = 1.02
    return model.eval()


def stats_for(model):
    """Class statistics of 5 classes over random features of `model`'s width."""
    from slca_peft.method import ClassStatistics

    stats = ClassStatistics(model.feature_dim)
    stats.update(torch.randn(20, model.feature_dim), torch.arange(5).repeat(4))
    stats.finalize(0)
    return stats


def _load_script(name: str):
    """A script under recipes/ as a module (registered in sys.modules: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_script():
    return _load_script


@pytest.fixture
def recipe():
    """The training recipe (`slca_peft.commands.recipe`, which recipes/train_seq.py runs)."""
    import slca_peft.commands.recipe

    return slca_peft.commands.recipe


def tiny_vit_config(**overrides) -> ViTConfig:
    values = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0,
    )
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture
def vit_config() -> ViTConfig:
    return tiny_vit_config()


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """A saved tiny ViT that checkpoints reference by path, as they would a Hub id.

    It stands in for a pre-trained backbone: with a wide initialisation (std 1.0) its class token
    varies between images, while at the usual 0.02 a random ViT's class token is nearly constant.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny-vit"
    ViTModel(tiny_vit_config(initializer_range=1.0), add_pooling_layer=False).save_pretrained(path)
    return path


def write_image_folder(root: Path, num_classes: int, per_class: int, seed: int = 0, size: int = 32) -> Path:
    """Class k is a bright square at a class-specific position with noise: learnable, not trivial."""
    rng = np.random.RandomState(seed)
    for k in range(num_classes):
        folder = root / f"class_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.randint(0, 60, size=(size, size, 3)).astype(np.uint8)
            row, col = divmod(k, 4)
            img[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 255
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return (
        write_image_folder(root / "train", num_classes=6, per_class=12, seed=1),
        write_image_folder(root / "test", num_classes=6, per_class=5, seed=2),
    )


#: The flags `recipe_argv` gives unless told otherwise: a tiny CPU run of 2-class tasks, one epoch.
RECIPE_FLAGS = dict(init_cls=2, increment=2, num_train_epochs=1, per_device_train_batch_size=8,
                    ca_samples_per_class=8, ca_batch_size=16, ca_epochs=1, use_cpu=True, disable_tqdm=True,
                    report_to="none", seed=3)


def recipe_argv(base_model_dir, folders, out, *extra, **flags) -> list[str]:
    """The argument list of a tiny CPU run of the recipe over image folders (train, test) into `out`.

    Keywords set flags by their names (`init_cls=4`, `learning_rate=0.05`, `horizontal_flip=False`) over
    `RECIPE_FLAGS`; a keyword set to None leaves its flag out (the recipe's default), as a `base_model_dir`
    of None leaves out --model_name_or_path (a continuation takes the checkpoint's). `extra` comes last: more
    flags, or overrides of these (the last value of a flag wins)."""
    train_dir, test_dir = folders
    values = {"model_name_or_path": base_model_dir, "train_dir": train_dir, "test_dir": test_dir,
              **RECIPE_FLAGS, **flags}
    argv = [item for name, value in values.items() if value is not None
            for item in (f"--{name}", str(value).lower() if isinstance(value, bool) else str(value))]
    return [*argv, "--output_dir", str(out), *extra]


@pytest.fixture(scope="session")
def tiny_image_folders(tmp_path_factory) -> tuple[Path, Path]:
    """4 classes, 4 training and 2 test images each: the smallest data a 2-task run scores."""
    root = tmp_path_factory.mktemp("tiny_images")
    return (
        write_image_folder(root / "train", num_classes=4, per_class=4, seed=1),
        write_image_folder(root / "test", num_classes=4, per_class=2, seed=2),
    )


@pytest.fixture(scope="module")
def frozen_gc():
    """Each task's Trainer ends with gc.collect(); freezing the objects alive before a module's tests
    makes that cheap (about a second per task on a loaded test process)."""
    gc.freeze()
    yield
    gc.unfreeze()


def start_forked(child: Callable[[], int]) -> int:
    """Start `child()` in a forked copy of this process and return its pid. A crash (SIGKILL), a lock held by
    another process or a resource limit needs a process of its own, but not a fresh interpreter re-importing
    torch. The child never returns into pytest: it exits with `child()`'s code, or 70 after a traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process: see the docstring
        pid = os.fork()
    if pid == 0:
        code = 70
        try:
            # The parent's OpenMP threads are not copied by fork(); a parallel region would wait for them forever
            # (as in a DataLoader worker, one thread avoids the pool).
            torch.set_num_threads(1)
            code = child()
        except BaseException:  # noqa: BLE001 - reported, then the child ends
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_forked(pid: int, timeout: float = 300) -> int:
    """How a child of `start_forked` ended: its exit code, or minus the signal that killed it."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} still running after {timeout} s")
        time.sleep(0.02)


def run_forked(child: Callable[[], int], timeout: float = 300) -> int:
    """`child()` in a forked copy of this process, waited for: its exit code, or minus the signal that killed it."""
    return wait_forked(start_forked(child), timeout)


def python_forked(script: str, *args: str, cwd: str | os.PathLike | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c script *args` as `subprocess.run(..., capture_output=True, text=True)` reports it, run in a
    forked copy of this process: a script that needs a process of its own (a resource limit, a timer) without
    the seconds a fresh interpreter spends importing torch and transformers."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")

        def child() -> int:
            with open(out, "w") as stdout, open(err, "w") as stderr:
                os.dup2(stdout.fileno(), 1)
                os.dup2(stderr.fileno(), 2)
                sys.stdout, sys.stderr = stdout, stderr
                sys.argv = ["-c", *args]
                if cwd is not None:
                    os.chdir(cwd)
                code = 0
                try:
                    exec(compile(script, "<script>", "exec"), {"__name__": "__main__"})
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                except BaseException:  # noqa: BLE001 - reported as a process would, then the child ends
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                return code

        code = run_forked(child, timeout)
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(["python", "-c", script, *args], code, stdout.read(), stderr.read())


@pytest.fixture
def forked():
    """`forked(child)`: see `run_forked`."""
    return run_forked


class _Exploit:
    """Unpickling this creates a directory: stands in for a pickle that runs an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def exploit(tmp_path):
    """(an object whose unpickling runs code, the path that code would create)."""
    marker = tmp_path / "pwned"
    return _Exploit(marker), marker


class HubRecorder:
    """Stands in for `huggingface_hub.HfApi`: records what each upload would send, sends nothing.

    `fail_uploads` holds the 1-based numbers of uploads that raise a network error.
    """

    def __init__(self, root: Path | None = None):
        #: Where a copy of each uploaded folder is kept (`uploads[i]["folder"]`), to load it as a repo.
        self.root = root
        self.repos: list[tuple[str, bool | None]] = []
        self.branches: list[tuple[str, str]] = []
        self.uploads: list[dict] = []
        self.fail_uploads: set[int] = set()

    def api(self, token=None):
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        assert exist_ok, "uploads must not fail on an existing repo"
        self.repos.append((repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
        assert exist_ok, "pushing to an existing branch must not fail"
        self.branches.append((repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, repo_type=None, create_pr=False,
                      commit_description=None):
        folder = Path(folder_path)
        self.uploads.append({
            "repo_id": repo_id, "message": commit_message, "revision": revision, "create_pr": create_pr,
            "description": commit_description,
            "files": sorted(p.name for p in folder.iterdir()),
            "json": {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")},
            "card": (folder / "README.md").read_text() if (folder / "README.md").is_file() else None,
        })
        if self.root is not None:
            self.uploads[-1]["folder"] = self.root / str(len(self.uploads))
            shutil.copytree(folder, self.uploads[-1]["folder"])
        if len(self.uploads) in self.fail_uploads:
            raise ConnectionError("Hub unreachable")
        return f"https://huggingface.co/{repo_id}/commit/{len(self.uploads)}"


@pytest.fixture
def hub(monkeypatch, tmp_path_factory) -> HubRecorder:
    import huggingface_hub

    recorder = HubRecorder(tmp_path_factory.mktemp("uploaded"))
    monkeypatch.setattr(huggingface_hub, "HfApi", recorder.api)
    return recorder


def hangs(function, *args, timeout: float = 20.0, **kwargs):
    """Run `function` in a thread; what it raised or returned, or "hung" when it does not return in time (a
    read that blocks on a FIFO or reads a device forever)."""
    outcome: list = []

    def run():
        try:
            outcome.append(function(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - the outcome is what the test looks at
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    return "hung" if worker.is_alive() else outcome[0]
