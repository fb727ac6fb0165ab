"""Training state (optimizer, scheduler, gradient scaler, random number generators) as safetensors + JSON.

`Trainer` writes these states with `torch.save` (pickles, which can run code when loaded); `SLCATrainer`
writes them with `save_state` instead: `NAME.safetensors` holds every tensor, `NAME.json` the nesting
around them and every other value. `load_state` reads them back into the same nesting: dicts (any
int/str/float/bool keys), lists, tuples, tensors, numpy arrays, numbers, strings, booleans and None.
Anything else (a function, a class instance) is refused when saving, naming where it is, so nothing
that needs a pickle is ever written.

Reading back trusts nothing: both files are opened as regular files of bounded size (a FIFO or a
device is refused, never read), the JSON's markers are checked (an array's dtype is one of a few
numeric types, its shape matches its data), and any damage is a `UserError` naming the file. What a
state must hold (shapes against the model's parameters, finite values) is checked by `check_like`
against the state the caller would build itself, before torch sees it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.errors import UserError
from ..utils.reading import open_regular, read_json
from .atomic import atomic_write_text, follow_umask, json_text
from .layout import TEMP_MARK, temporary_name

FORMAT = "slca-peft-state"
VERSION = 1
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _ITEMS)
_KEY_TYPES = (str, int, float, bool)
#: The numpy dtypes a state may hold (numpy's generator state is `<u4`): fixed-size numbers only.
_ARRAY_DTYPES = frozenset(f"{order}{kind}{size}" for order in "<|" for kind in "uif" for size in (1, 2, 4, 8)) | {"|b1"}
#: Largest tensor file of a state other than the optimizer's (generator states are a few kilobytes).
MAX_STATE_BYTES = 16 << 20


class _Damaged(Exception):
    """A marker whose content is not what `save_state` writes."""


def state_files(folder: str | Path, name: str) -> tuple[Path, Path]:
    """(NAME.json, NAME.safetensors) in `folder`."""
    folder = Path(folder)
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def has_state(folder: str | Path, name: str) -> bool:
    """Whether `folder` holds the state `name` (its JSON file, written last; anything at that name counts,
    so a FIFO or a folder there is refused by `load_state` rather than taken for a missing state)."""
    return os.path.lexists(state_files(folder, name)[0])


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


def _array(inner: Any) -> np.ndarray:
    if not isinstance(inner, dict) or set(inner) != {"dtype", "shape", "data"}:
        raise _Damaged("an array is not {dtype, shape, data}")
    dtype, shape, data = inner["dtype"], inner["shape"], inner["data"]
    if dtype not in _ARRAY_DTYPES:
        raise _Damaged(f"an array has dtype {str(dtype)[:40]!r}, not one of the numeric types a state holds")
    if not isinstance(shape, list) or any(type(n) is not int or n < 0 for n in shape) or not isinstance(data, list) \
            or math.prod(shape) != len(data):
        raise _Damaged("an array's shape does not match its data")
    if any(type(v) not in (int, float, bool) for v in data):
        raise _Damaged("an array holds a value that is not a number")
    return np.asarray(data, dtype=np.dtype(dtype)).reshape(shape)


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker == _TENSOR:
            if not isinstance(inner, str) or inner not in tensors:
                raise UserError(f"{source} names tensor {str(inner)[:40]!r}, which its .safetensors file lacks; the "
                                "checkpoint is damaged.")
            return tensors[inner]
        if marker == _ARRAY:
            return _array(inner)
        if marker == _TUPLE:
            if not isinstance(inner, list):
                raise _Damaged("a tuple is not a list")
            return tuple(_decode(v, tensors, source) for v in inner)
        if marker == _ITEMS:
            if not isinstance(inner, list) or any(not isinstance(kv, list) or len(kv) != 2
                                                  or not isinstance(kv[0], _KEY_TYPES) for kv in inner):
                raise _Damaged("a mapping is not a list of [key, value] pairs")
            return {k: _decode(v, tensors, source) for k, v in inner}
    return {k: _decode(v, tensors, source) for k, v in value.items()}


def save_state(state: Any, folder: str | Path, name: str) -> None:
    """Write `state` as `folder/NAME.safetensors` and `folder/NAME.json` (the JSON last, so a reader that
    finds it finds both)."""
    json_path, tensor_path = state_files(folder, name)
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, tensors, name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_path.with_name(temporary_name(tensor_path.name, TEMP_MARK, os.getpid()))
    try:
        save_file(tensors, str(tmp))
        follow_umask(tmp)
        os.replace(tmp, tensor_path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(json_path, json_text({"format": FORMAT, "version": VERSION, "state": body}, sort_keys=False))


def load_state(folder: str | Path, name: str, max_bytes: int = MAX_STATE_BYTES) -> Any:
    """The state `save_state` wrote to `folder` as NAME; a missing, damaged or oversized pair (tensors
    beyond `max_bytes`), or one that is not two regular files, is a `UserError` naming the file."""
    from safetensors import SafetensorError

    json_path, tensor_path = state_files(folder, name)
    fix = "the checkpoint is damaged: resume from another checkpoint-N"
    try:
        data = read_json(json_path)
    except FileNotFoundError:
        raise UserError(f"{json_path} is missing; {fix}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "state" not in data:
        raise UserError(f"{json_path} is not a training state slca-peft wrote; {fix}.")
    if data.get("version") != VERSION:
        raise UserError(f"{json_path} has format version {data.get('version')!r}, this slca-peft reads {VERSION}; "
                        "upgrade slca-peft.")
    try:
        with open_regular(tensor_path, max_bytes, fix=fix):
            pass  # a regular file of bounded size: load_file never blocks on a FIFO nor maps a device
        tensors = load_file(str(tensor_path))
    except FileNotFoundError:
        raise UserError(f"{tensor_path} is missing beside {json_path.name}; {fix}.") from None
    except SafetensorError as err:
        raise UserError(f"{tensor_path} is not a valid safetensors file ({' '.join(str(err).split())}); {fix}.") \
            from None
    try:
        return _decode(data["state"], tensors, json_path)
    except (_Damaged, TypeError, ValueError, OverflowError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{json_path}: {err}; {fix}.") from None


def _number_ok(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def check_like(value: Any, reference: Any, where: str, source: Path | str) -> None:
    """Refuse (`UserError` naming `source`) a loaded state that is not shaped like `reference`, the state
    the caller would build itself: the same keys, lengths and kinds of value, tensors and arrays of the
    same shape and dtype, every number and float tensor finite."""
    def bad(what: str) -> UserError:
        return UserError(f"{source}: {where} {what}; the checkpoint is damaged or was written for another model or "
                         "configuration: resume from another checkpoint-N.")

    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape or value.dtype != reference.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise bad(f"is {got}, expected a tensor {tuple(reference.shape)} {reference.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise bad("holds non-finite values")
    elif isinstance(reference, np.ndarray):
        if not isinstance(value, np.ndarray) or value.shape != reference.shape or value.dtype != reference.dtype:
            raise bad(f"is not an array {reference.shape} {reference.dtype}")
    elif isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            keys = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise bad(f"has keys {str(keys)[:120]}, expected {sorted(map(str, reference))}")
        for key in reference:
            check_like(value[key], reference[key], f"{where}.{key}", source)
    elif isinstance(reference, (list, tuple)):
        if type(value) is not type(reference) or len(value) != len(reference):
            raise bad(f"is not a {type(reference).__name__} of {len(reference)} items")
        for i, (v, r) in enumerate(zip(value, reference, strict=True)):
            check_like(v, r, f"{where}[{i}]", source)
    elif isinstance(reference, bool) or reference is None or isinstance(reference, str):
        if type(value) is not type(reference):
            raise bad(f"is {type(value).__name__}, expected {type(reference).__name__}")
    elif isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _number_ok(value):
            raise bad(f"is {str(value)[:40]!r}, expected a finite number")
        if isinstance(reference, int) and not isinstance(value, int):
            raise bad(f"is {value!r}, expected an integer")
