"""Training state (optimizer, scheduler, gradient scaler, random number generators) as safetensors + JSON.

`Trainer` writes these states with `torch.save` (pickles, which can run code when loaded); `SLCATrainer`
writes them with `save_state` instead: `NAME.safetensors` holds every tensor, `NAME.json` the nesting
around them and every other value. `load_state` reads them back into the same nesting: dicts (any
int/str/float/bool keys), lists, tuples, tensors, numpy arrays, numbers, strings, booleans and None.
Anything else (a function, a class instance) is refused when saving, naming where it is, so nothing
that needs a pickle is ever written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.errors import UserError
from ..utils.reading import read_json
from .atomic import atomic_write_text, follow_umask, json_text

FORMAT = "slca-peft-state"
VERSION = 1
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _ITEMS)
_KEY_TYPES = (str, int, float, bool)


def state_files(folder: str | Path, name: str) -> tuple[Path, Path]:
    """(NAME.json, NAME.safetensors) in `folder`."""
    folder = Path(folder)
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def has_state(folder: str | Path, name: str) -> bool:
    """Whether `folder` holds the state `name` (its JSON file, written last)."""
    return state_files(folder, name)[0].is_file()


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # own storage: no shared tensors
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and k not in _MARKERS for k in value)
        if plain:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        bad = [k for k in value if not isinstance(k, _KEY_TYPES)]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} of type {type(bad[0]).__name__} cannot be written without a "
                            "pickle.")
        return {_ITEMS: [[k, _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be written without a pickle; keep training "
                    "state to tensors, numbers, strings, lists and dicts.")


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker == _TENSOR:
            if inner not in tensors:
                raise UserError(f"{source} names tensor {inner!r}, which its .safetensors file lacks; the checkpoint "
                                "is damaged.")
            return tensors[inner]
        if marker == _ARRAY:
            return np.asarray(inner["data"], dtype=np.dtype(inner["dtype"])).reshape(inner["shape"])
        if marker == _TUPLE:
            return tuple(_decode(v, tensors, source) for v in inner)
        if marker == _ITEMS:
            return {k: _decode(v, tensors, source) for k, v in inner}
    return {k: _decode(v, tensors, source) for k, v in value.items()}


def save_state(state: Any, folder: str | Path, name: str) -> None:
    """Write `state` as `folder/NAME.safetensors` and `folder/NAME.json` (the JSON last, so a reader that
    finds it finds both)."""
    json_path, tensor_path = state_files(folder, name)
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, tensors, name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_path.with_name(f".{tensor_path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        follow_umask(tmp)
        os.replace(tmp, tensor_path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(json_path, json_text({"format": FORMAT, "version": VERSION, "state": body}, sort_keys=False))


def load_state(folder: str | Path, name: str) -> Any:
    """The state `save_state` wrote to `folder` as NAME; a missing or damaged pair is a `UserError`."""
    json_path, tensor_path = state_files(folder, name)
    data = read_json(json_path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or "state" not in data:
        raise UserError(f"{json_path} is not a training state slca-peft wrote; the checkpoint is damaged.")
    if data.get("version") != VERSION:
        raise UserError(f"{json_path} has format version {data.get('version')}, this slca-peft reads {VERSION}; "
                        "upgrade slca-peft.")
    try:
        tensors = load_file(str(tensor_path))
    except FileNotFoundError:
        raise UserError(f"{tensor_path} is missing beside {json_path.name}; the checkpoint is damaged.") from None
    return _decode(data["state"], tensors, json_path)
