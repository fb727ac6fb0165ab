"""A `checkpoint-N` of SLCATrainer is checked like any checkpoint before `Trainer` or torch reads it: its
state files are listed in its manifest, bounded, shaped like the states this run builds and finite."""

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import hangs, python_forked
from safetensors.torch import load_file, save_file

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer
from slca_peft.artifacts import manifest
from slca_peft.artifacts.state_files import load_state
from slca_peft.utils.errors import UserError


def toy_dataset(labels: list[int]) -> datasets.Dataset:
    rng = np.random.RandomState(0)
    pixels = rng.randn(len(labels), 3, 32, 32).astype(np.float32)
    for i, y in enumerate(labels):
        pixels[i, :, (y % 4) * 8: (y % 4) * 8 + 8, :] += 3.0
    return datasets.Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def make_trainer(base_model_dir: Path, out: Path, **kw) -> SLCATrainer:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    args = SLCAConfig(output_dir=str(out), use_cpu=True, num_train_epochs=2, per_device_train_batch_size=8,
                      report_to="none", disable_tqdm=True, save_strategy="epoch", learning_rate=0.05, seed=0, **kw)
    return SLCATrainer(model=model, args=args, train_dataset=toy_dataset([0, 1] * 8))


@pytest.fixture(scope="module")
def trained_run(base_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("states") / "run"
    make_trainer(base_model_dir, run).train()
    return run


@pytest.fixture
def checkpoint(trained_run, tmp_path) -> Path:
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(trained_run / "checkpoint-2", copy)
    return copy


def release(fifo: Path) -> None:
    """Give a reader blocked on `fifo` its end of file (a test that fails must not leave a thread waiting)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def edit_json(checkpoint: Path, name: str, change, *, re_record: bool = True) -> None:
    path = checkpoint / name
    data = json.loads(path.read_text())
    change(data["state"] if "state" in data else data)
    path.write_text(json.dumps(data))
    if re_record:  # the manifest re-recorded too: only the content check is left to catch it
        manifest.record(checkpoint, [name])


def resume(base_model_dir: Path, checkpoint: Path, tmp_path: Path, **kw):
    trainer = make_trainer(base_model_dir, tmp_path / "resumed", **kw)
    return trainer, lambda: trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_checkpoint_lists_its_state_files_and_resumes(trained_run, base_model_dir, checkpoint, tmp_path):
    listed = set(manifest.read_manifest(checkpoint))
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "scheduler.safetensors", "rng_state.json",
            "rng_state.safetensors", "trainer_state.json", "training_args.json"} <= listed
    trainer, run = resume(base_model_dir, checkpoint, tmp_path)
    run()
    assert trainer.state.global_step == 4
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


@pytest.mark.parametrize("name,where,value", [
    ("scheduler.json", "base_lrs", float("nan")),
    ("scheduler.json", "base_lrs", 1e308),
    ("scheduler.json", "_last_lr", 1e308),
    ("optimizer.json", "lr", float("nan")),
    ("optimizer.json", "lr", 1e308),
    ("optimizer.json", "momentum", 1e308),
])
def test_non_finite_or_huge_learning_rates_in_a_state_file_are_refused(base_model_dir, checkpoint, tmp_path,
                                                                        name, where, value):
    def change(state):
        if name == "scheduler.json":
            state[where][0] = value
        else:
            state["param_groups"][0][where] = value

    edit_json(checkpoint, name, change)
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    with pytest.raises(UserError, match=f"{name}.*(not finite|exceeds|outside|not this run|arguments give|finite)"):
        run()


def test_a_state_file_changed_since_written_is_refused_naming_it(base_model_dir, checkpoint, tmp_path):
    edit_json(checkpoint, "scheduler.json", lambda s: s["base_lrs"].__setitem__(0, 0.5), re_record=False)
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    with pytest.raises(UserError, match="scheduler.json: its content changed"):
        run()


def test_optimizer_state_of_another_shape_is_refused(base_model_dir, checkpoint, tmp_path):
    tensors = load_file(checkpoint / "optimizer.safetensors")
    key = next(k for k, v in tensors.items() if v.ndim >= 1 and v.numel() > 1)
    tensors[key] = torch.zeros(tensors[key].numel() + 1)
    save_file(tensors, checkpoint / "optimizer.safetensors")
    manifest.record(checkpoint, ["optimizer.safetensors"])
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    with pytest.raises(UserError, match="optimizer.json: .*has shape"):
        run()


def test_a_missing_optimizer_state_is_refused_unless_asked_for(base_model_dir, checkpoint, tmp_path, caplog):
    (checkpoint / "optimizer.json").unlink()
    (checkpoint / "optimizer.safetensors").unlink()
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    with pytest.raises(UserError, match="optimizer.json is missing.*resume_without_optimizer_state"):
        run()
    trainer, run = resume(base_model_dir, checkpoint, tmp_path / "knowingly", resume_without_optimizer_state=True)
    run()
    assert trainer.state.global_step == 4
    assert "fresh optimizer" in caplog.text


def test_a_fifo_optimizer_safetensors_or_trainer_state_never_hangs(base_model_dir, checkpoint, tmp_path):
    (checkpoint / "optimizer.safetensors").unlink()
    os.mkfifo(checkpoint / "optimizer.safetensors")
    try:
        result = hangs(load_state, checkpoint, "optimizer")
        assert isinstance(result, UserError) and "optimizer.safetensors is a FIFO" in str(result), result
    finally:
        release(checkpoint / "optimizer.safetensors")
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    result = hangs(run)
    release(checkpoint / "optimizer.safetensors")
    assert isinstance(result, UserError) and "optimizer.safetensors: not a regular file" in str(result), result



@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "unlisted", "bad_value"])
def test_trainer_state_json_is_checked_before_transformers_reads_it(base_model_dir, checkpoint, tmp_path, kind):
    path = checkpoint / "trainer_state.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "unlisted":
        path.write_text(json.dumps({"global_step": 2}))
        entries = manifest.read_manifest(checkpoint)
        del entries["trainer_state.json"]
        manifest.write_manifest(checkpoint, entries.values(), manifest.read_manifest_extra(checkpoint))
    else:
        path.write_text(json.dumps({"global_step": "two", "nonsense": 1}))
        manifest.record(checkpoint, ["trainer_state.json"])
    _, run = resume(base_model_dir, checkpoint, tmp_path)
    result = hangs(run)
    if kind == "fifo":
        release(path)
    assert isinstance(result, UserError) and "trainer_state.json" in str(result), result


RNG_BOMB_UNDER_CAP = """
import resource, sys
from slca_peft.artifacts.state_files import load_state
from slca_peft.utils.errors import UserError
with open("/proc/self/status") as fh:
    used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    load_state(sys.argv[1], "rng_state")
    print("LOADED")
except UserError as err:
    print("REFUSED", " ".join(str(err).split()))
except MemoryError:
    print("ALLOCATED")
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_state_file_cannot_ask_numpy_for_a_huge_dtype(checkpoint):
    # A few hundred bytes of JSON asking for 59.6 GiB: one void item of 64e9 bytes.
    edit_json(checkpoint, "rng_state.json",
              lambda s: s["numpy"]["__tuple__"].__setitem__(1, {"__ndarray__": {"dtype": "V64000000000",
                                                                                 "shape": [1], "data": [0]}}))
    proc = python_forked(RNG_BOMB_UNDER_CAP, str(checkpoint), cwd=checkpoint)
    assert proc.stdout.startswith("REFUSED") and "rng_state.json" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    for bad in ({"dtype": "<u4", "shape": [3], "data": [1]}, {"dtype": "O", "shape": [1], "data": [1]},
                {"dtype": "<u4", "shape": [1], "data": ["x"]}):
        edit_json(checkpoint, "rng_state.json", lambda s, bad=bad: s["numpy"]["__tuple__"].__setitem__(
            1, {"__ndarray__": bad}))
        with pytest.raises(UserError, match="rng_state.json"):
            load_state(checkpoint, "rng_state")
