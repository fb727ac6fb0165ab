"""How checkpoints name and load the base model they were trained on.

A checkpoint stores only what training changed and references its base model by name, so that
name must mean the same thing from any working directory and on any machine: a Hub id, or an
absolute path. Base weights are only read from safetensors (never a pickle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoModel, PreTrainedModel


def is_local_name(name: str) -> bool:
    """A base model name only this machine can resolve (a directory, not a Hub id)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or Path(name).exists()


def portable_name(name: str | os.PathLike | None) -> str | None:
    """A Hub id as is; an existing local directory as its absolute path."""
    if name is None:
        return None
    name = str(name)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_base_model(name: str, revision: str | None = None, **kwargs) -> PreTrainedModel:
    """`AutoModel.from_pretrained` reading safetensors only: a base folder holding only a pickle
    (pytorch_model.bin) is refused with an error that says how to convert it."""
    try:
        return AutoModel.from_pretrained(name, revision=revision, use_safetensors=True, **kwargs)
    except OSError as err:
        folder = Path(name)
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise ValueError(
                f"the base model folder {folder} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                "slca-peft never opens pickle files. Convert it once, in an environment you trust: "
                "AutoModel.from_pretrained(path, use_safetensors=False).save_pretrained(path) writes "
                "model.safetensors."
            ) from err
        raise


def resolve_recorded_base(
    base: str | None, source: str | Path, alternatives: Sequence[str | None] = ()
) -> str | None:
    """The base model a checkpoint records, made loadable.

    Older checkpoints may record a path relative to the directory their run started in: it is used
    when it still resolves from here; otherwise an existing directory among `alternatives` (what the
    caller passed as the base model) stands in; otherwise one error names the missing path.
    """
    if base is None or Path(base).is_absolute() or not is_local_name(base):
        if base is not None and Path(base).is_absolute() and not Path(base).exists():
            return _from_alternatives(base, source, alternatives)
        return base
    if Path(base).expanduser().is_dir():
        return portable_name(base)
    return _from_alternatives(base, source, alternatives)


def _from_alternatives(base: str, source: str | Path, alternatives: Sequence[str | None]) -> str:
    for name in alternatives:
        if name and Path(name).expanduser().is_dir():
            return portable_name(name)
    raise FileNotFoundError(
        f"{source} references the base model {base!r}, which does not exist "
        f"(relative paths resolve from the current directory, {os.getcwd()}). Pass the base model's location: "
        "--model_name_or_path PATH with the recipe, or load_checkpoint(..., expected_base=PATH) from Python."
    )
