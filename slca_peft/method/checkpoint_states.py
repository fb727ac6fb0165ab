"""Checks on the training states of an `SLCATrainer` `checkpoint-N` before `Trainer` or torch reads them.

Each state file must be the one slca-peft wrote (listed in the folder's manifest, unchanged), bounded
and shaped like the state this run would build: the optimizer's parameter groups and per-parameter
tensors against the model's parameters and the arguments' hyperparameters, the scheduler's rates
against the arguments', every number finite. A failure is a `UserError` naming the file.
"""

from __future__ import annotations

import logging
import math
import os
import random
from typing import Any

import numpy as np
import torch
from transformers.trainer_callback import TrainerState

from ..artifacts import manifest
from ..artifacts.layout import TRAINER_STATE_FILE
from ..artifacts.state_files import check_like, has_state, load_state, state_files
from ..utils.errors import UserError
from ..utils.reading import read_json

#: The states a `checkpoint-N` folder holds beside the model files, each as NAME.safetensors + NAME.json.
OPTIMIZER_STATE, SCHEDULER_STATE, SCALER_STATE, RNG_STATE = "optimizer", "scheduler", "scaler", "rng_state"
logger = logging.getLogger(__name__)
#: Largest trainer_state.json read (its log history grows with the steps logged; a long run's is a few MB).
MAX_TRAINER_STATE_BYTES = 64 << 20


def _resume_fix(folder: str) -> str:
    return f"resume from another checkpoint-N than {folder}, or start the run again"


def check_own_file(folder: str, entries: dict, rel: str) -> None:
    """Refuse a file of a `checkpoint-N` that its manifest does not list, or that changed since it was written."""
    path = os.path.join(folder, rel)
    entry = entries.get(rel)
    if entry is None:
        raise UserError(f"{path} is not listed in {manifest.MANIFEST_FILE}, so slca-peft did not write it there (or "
                        f"an older slca-peft did); {_resume_fix(folder)}.")
    why = manifest.check_listed(folder, entry)
    if why is not None:
        raise UserError(f"{path} is missing though {manifest.MANIFEST_FILE} lists it; {_resume_fix(folder)}."
                        if why == "missing" else f"{path}: {why}; {_resume_fix(folder)}.")


def check_trainer_state(path: str) -> None:
    """`trainer_state.json` read bounded (a FIFO, a device, a huge file refused) and shaped as `TrainerState`
    takes it, before transformers reads it."""
    data = read_json(path, MAX_TRAINER_STATE_BYTES)
    known = set(TrainerState.__dataclass_fields__)
    if not isinstance(data, dict) or not set(data) <= known:
        extra = sorted(set(data) - known)[:3] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a trainer state ({extra}); the checkpoint is damaged.")
    for key in ("global_step", "max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps"):
        value = data.get(key, 0)
        if value is not None and (type(value) is not int or value < 0):
            raise UserError(f"{path}: {key} is {str(value)[:40]!r}, not a count; the checkpoint is damaged.")
    for key in ("epoch", "best_metric", "total_flos"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise UserError(f"{path}: {key} is {str(value)[:40]!r}, not a finite number; the checkpoint is damaged.")
    for key, kind in (("log_history", list), ("stateful_callbacks", dict), ("best_model_checkpoint", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise UserError(f"{path}: {key} is not a {kind.__name__}; the checkpoint is damaged.")


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, source: str) -> None:
    """A loaded optimizer state that this run's optimizer could have written: the same parameter groups
    (parameters, hyperparameters as the arguments set them, learning rates finite and at most the
    group's initial rate), per-parameter tensors finite and shaped like their parameter."""
    reference = optimizer.state_dict()

    def bad(what: str) -> UserError:
        return UserError(f"{source}: {what}; the optimizer state was written for another model or other arguments, or "
                         "is damaged: resume with the arguments it was trained with, or from another checkpoint-N.")

    if not isinstance(state, dict) or set(state) != {"state", "param_groups"} or not isinstance(state["state"], dict):
        raise bad("it is not an optimizer state ({state, param_groups})")

    groups = state["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(reference["param_groups"]):
        raise bad(f"it has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, this run "
                  f"{len(reference['param_groups'])}")
    for i, (group, ref) in enumerate(zip(groups, reference["param_groups"], strict=True)):
        if not isinstance(group, dict) or set(group) != set(ref):
            raise bad(f"parameter group {i} has other fields than this run's optimizer")
        if group["params"] != ref["params"]:
            raise bad(f"parameter group {i} holds other parameters than this model's")
        for key, expected in ref.items():
            value = group[key]
            if key in ("params",) or isinstance(expected, bool) or expected is None:
                continue
            if isinstance(expected, str):
                if value != expected:
                    raise bad(f"parameter group {i} is {str(value)[:40]!r}, this run's {expected!r}")
                continue
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in numbers):
                raise bad(f"parameter group {i}: {key} is {str(value)[:40]}, not finite")
            if key == "lr":
                ceiling = ref.get("initial_lr", None)
                if ceiling is not None and value > ceiling * (1 + 1e-6) + 1e-12:
                    raise bad(f"parameter group {i}: lr {value:g} exceeds its initial rate {ceiling:g}")
                if value < 0:
                    raise bad(f"parameter group {i}: lr {value:g} is negative")
            elif tuple(numbers) != tuple(expected if isinstance(expected, (tuple, list)) else (expected,)) and not all(
                    math.isclose(a, b, rel_tol=1e-6) for a, b in zip(numbers, expected if isinstance(
                        expected, (tuple, list)) else (expected,), strict=False)):
                raise bad(f"parameter group {i}: {key} is {value}, the arguments give {expected}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = state["state"]
    for index, values in per_param.items():
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(values, dict):
            raise bad(f"state of parameter {str(index)[:20]!r} names no parameter of this model")
        shape = tuple(params[index].shape)
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if tuple(value.shape) != shape and value.numel() != 1:
                    raise bad(f"{key} of parameter {index} has shape {tuple(value.shape)}, the parameter {shape}")
                if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                    raise bad(f"{key} of parameter {index} is not finite floating point")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{key} of parameter {index} is {str(value)[:40]!r}, not a finite number")


def check_scheduler_state(state: Any, scheduler: Any, source: str) -> None:
    """A loaded scheduler state shaped like this run's, its base rates the arguments' and its last rates
    finite and at most those."""
    reference = scheduler.state_dict()
    check_like(state, reference, "the scheduler state", source)
    if "base_lrs" in reference:
        for got, expected in zip(state["base_lrs"], reference["base_lrs"], strict=True):
            if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
                raise UserError(f"{source}: the base learning rate {got:g} is not this run's {expected:g}; resume with "
                                "the arguments the checkpoint was trained with, or from another checkpoint-N.")
        for got, base in zip(state.get("_last_lr") or [], state["base_lrs"], strict=False):
            if got < 0 or got > base * (1 + 1e-6) + 1e-12:
                raise UserError(f"{source}: the last learning rate {got:g} lies outside [0, {base:g}]; the checkpoint "
                                "is damaged: resume from another checkpoint-N.")


def check_checkpoint_folder(folder: str, rng_name: str, without_optimizer: bool) -> None:
    """Refuse a `checkpoint-N` whose trainer and training states are not the files slca-peft wrote (listed
    in its manifest, unchanged), whose `trainer_state.json` is not a bounded regular file holding a trainer
    state, or that lacks the optimizer state (unless `without_optimizer`)."""
    if not os.path.isdir(folder):
        raise UserError(f"resume_from_checkpoint={folder!r} is not a directory; give a checkpoint-N folder.")
    entries = manifest.read_manifest(folder)
    if entries is None:
        raise UserError(f"{folder} holds no {manifest.MANIFEST_FILE}, so it is not a checkpoint slca-peft wrote; "
                        "resume from a checkpoint-N of SLCATrainer.")
    check_own_file(folder, entries, TRAINER_STATE_FILE)
    check_trainer_state(os.path.join(folder, TRAINER_STATE_FILE))
    if not has_state(folder, OPTIMIZER_STATE) and not without_optimizer:
        raise UserError(
            f"{state_files(folder, OPTIMIZER_STATE)[0]} is missing: the checkpoint holds no optimizer state "
            "(written with save_only_model=True, or damaged), so the resumed run would differ from an "
            "uninterrupted one; resume from another checkpoint-N, or set resume_without_optimizer_state=True "
            "(--resume_without_optimizer_state) to go on with a fresh optimizer and schedule."
        )
    names = [OPTIMIZER_STATE, SCHEDULER_STATE] if has_state(folder, OPTIMIZER_STATE) else []
    names += [name for name in (SCALER_STATE, rng_name) if has_state(folder, name)]
    for name in names:
        for path in state_files(folder, name):
            check_own_file(folder, entries, path.name)


def restore_rng_states(checkpoint: str, name: str) -> None:
    """Set Python's, numpy's, torch's and (where there are GPUs) CUDA's generators from the checked state `name`."""
    source = str(state_files(checkpoint, name)[0])
    states = load_state(checkpoint, name)
    cuda = states.pop("cuda", None) if isinstance(states, dict) else None
    reference = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    check_like(states, reference, "the generator state", source)
    try:
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:
        raise UserError(f"{source}: a generator state is invalid ({err}); the checkpoint is damaged.") from None
    if torch.cuda.is_available() and cuda is not None:
        try:
            torch.cuda.random.set_rng_state_all(cuda)
        except (RuntimeError, IndexError, TypeError) as err:
            logger.info("CUDA generator states not restored (%s); the resumed run may differ.", err)


def record_states(folder: str, args_file: str, world_size: int) -> None:
    """List the training states, `trainer_state.json` and the arguments file of `folder` in its manifest."""
    names = [args_file, TRAINER_STATE_FILE]
    rng = [RNG_STATE] + [f"{RNG_STATE}_{i}" for i in range(max(1, world_size))]
    for name in (OPTIMIZER_STATE, SCHEDULER_STATE, SCALER_STATE, *rng):
        names += [path.name for path in state_files(folder, name)]
    manifest.record(folder, [name for name in names if os.path.isfile(os.path.join(folder, name))])


def checked_optimizer_states(checkpoint: str, optimizer: torch.optim.Optimizer, scheduler: Any,
                             model: torch.nn.Module) -> tuple[Any, Any]:
    """The optimizer and scheduler states of `checkpoint`, checked against this run's (`check_optimizer_state`,
    `check_scheduler_state`); the optimizer's tensor file at most four fp64 buffers per trainable parameter
    (Adam with amsgrad holds three) plus headers."""
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = load_state(checkpoint, OPTIMIZER_STATE, 32 * numel + (16 << 20))
    check_optimizer_state(state, optimizer, str(state_files(checkpoint, OPTIMIZER_STATE)[0]))
    schedule = load_state(checkpoint, SCHEDULER_STATE)
    check_scheduler_state(schedule, scheduler, str(state_files(checkpoint, SCHEDULER_STATE)[0]))
    return state, schedule


def checked_scaler_state(checkpoint: str, reference: dict) -> Any:
    """The gradient scaler state of `checkpoint`, shaped like `reference`, its scale and factors positive."""
    state = load_state(checkpoint, SCALER_STATE)
    source = str(state_files(checkpoint, SCALER_STATE)[0])
    check_like(state, reference, "the gradient scaler state", source)
    if any(isinstance(v, float) and v <= 0 for v in state.values()):
        raise UserError(f"{source}: a scale or factor is not positive; the checkpoint is damaged.")
    return state
