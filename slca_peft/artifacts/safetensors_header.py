"""Read and check a safetensors header before any tensor is touched.

`safe_open` maps the whole file, and a tensor read allocates what the header declares, so a crafted
file (a 52 KB sparse file whose header declares 512 GiB) could exhaust memory before any check ran.
`read_header` parses the 8-byte length and the JSON header with plain reads, bounded, and checks
that the declared tensors tile the file exactly and are backed by data actually stored on disk.
"""

from __future__ import annotations

import os
import struct
from math import prod
from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from ..utils.reading import loads_json, open_regular

#: Largest header accepted (the JSON listing of tensor names, dtypes, shapes, offsets).
MAX_HEADER_BYTES = 16 << 20
#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: Declared data may exceed the bytes allocated on disk by this factor (filesystem compression) plus 1 MiB.
SPARSE_SLACK = 4


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """`({name: {"dtype", "shape", "data_offsets"}}, metadata)`, validated; raises `UserError` naming `path`."""
    path = Path(path)
    with open_regular(path, fix="a safetensors file is a regular file") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path} is not a valid safetensors file (shorter than 8 bytes); it may be truncated.")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path} is not a valid safetensors file (a {length}-byte header in a {size}-byte file); "
                            "it may be truncated.")
        header = loads_json(fh.read(length), f"{path}'s header")
    if not isinstance(header, dict):
        raise UserError(f"{path} has a header that is not a JSON object; the file is damaged.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path} has malformed metadata; the file is damaged.")
    spans = []
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in DTYPE_BYTES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise UserError(f"{path}: tensor {name!r} has a malformed header entry; the file is damaged.")
        start, end = info["data_offsets"]
        if end - start != prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]:
            raise UserError(f"{path}: tensor {name!r} declares shape {info['shape']} but {end - start} bytes; "
                            "the file is damaged.")
        spans.append((start, end))
    declared = size - 8 - length
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise UserError(f"{path}: tensor data offsets overlap or leave gaps; the file is damaged.")
        position = end
    if position != declared:
        raise UserError(f"{path} is not a valid safetensors file (tensors cover {position} of {declared} data "
                        "bytes); it may be truncated.")
    stored = getattr(os.stat(path), "st_blocks", None)
    if stored is not None and declared > SPARSE_SLACK * stored * 512 + (1 << 20):
        raise UserError(
            f"{path} declares {declared} bytes of tensors but stores only {stored * 512} on disk (a sparse or "
            "crafted file); refusing to read it."
        )
    return header, metadata


def check_tensors(path: str | Path, header: dict[str, dict[str, Any]], dtypes: dict[str, set[str]],
                  max_bytes: int) -> None:
    """Exactly the tensors of `dtypes` (name -> allowed dtype codes) and at most `max_bytes` in all."""
    if set(header) != set(dtypes):
        raise UserError(f"{path} holds tensors {sorted(header)}, expected {sorted(dtypes)}; the file is damaged.")
    for name, allowed in dtypes.items():
        if header[name]["dtype"] not in allowed:
            raise UserError(f"{path}: tensor {name} has unexpected dtype {header[name]['dtype']} (expected one of "
                            f"{sorted(allowed)}); the file is damaged.")
    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values())
    if total > max_bytes:
        raise UserError(f"{path} declares {total} bytes of tensors, more than the {max_bytes} its shapes allow; "
                        "the file is damaged.")
