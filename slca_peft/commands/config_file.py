"""Config files of the recipe's arguments: a YAML or JSON mapping of flag names to values, given as
`--config FILE`, `--config=FILE`, a .yaml/.yml/.json first argument (as transformers' example scripts take
`run_x.py args.json`) or the name of a config shipped with the package.

`read_config` turns the file into the flags it stands for, checked against the parser's fields, so that
the command line's own flags, which come after them, override them. The file is read bounded, a key
given twice is refused (YAML and JSON parsers would keep the last value without a word), and so is a
file whose aliases expand it beyond `MAX_EXPANSION` times its size (an alias bomb of a few hundred
bytes would otherwise fill memory when its values are turned into flags).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..utils.errors import UserError
from ..utils.reading import read_text


def shipped_file(kind: str, name: str) -> Path:
    """A file under recipes/ (`configs`, `assets`): inside the installed package (a wheel ships them
    as slca_peft/_recipes/configs, slca_peft/_recipes/assets, keeping the configs' relative paths to
    the assets), else in the source tree."""
    here = Path(__file__).resolve().parents[1]
    installed = here / "_recipes" / kind / name
    return installed if installed.exists() else here.parent / "recipes" / kind / name


DEMO_CONFIG = shipped_file("configs", "demo_digits.yaml")


#: Arguments that name an input file or folder: a relative value in a config file is looked up next to
#: the file first (see `read_config`). Outputs (`output_dir`, `logging_dir`) stay relative to the
#: working directory, where the command runs.
CONFIG_PATH_KEYS = ("model_name_or_path", "model_config", "peft_config", "resume_from", "dataset", "data_dir",
                    "train_dir", "test_dir", "deepspeed", "fsdp_config", "accelerator_config")
#: A config file given without `--config`, as the first argument (transformers' example scripts: `run_x.py args.json`).
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _resolve_config_path(value: str, base: Path) -> str:
    """`value` against the config file's folder when it exists there, else as written (working directory).

    When both name the same file, the value is kept as written, so a run started before this rule
    keeps its fingerprint."""
    path = Path(value).expanduser()
    candidate = base / path
    if path.is_absolute() or value == "auto" or not candidate.exists():
        return value
    if path.exists() and os.path.samefile(path, candidate):
        return value
    return os.path.normpath(candidate)


#: How many times its own size a config file may grow to once its YAML aliases are expanded.
MAX_EXPANSION = 10


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (merge keys `<<` may still be overridden)."""

    source = ""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the parser's own error says so
                    continue
                if first is not None:
                    raise UserError(f"--config {self.source}: key {str(key)[:80]!r} is given twice (lines {first} and "
                                    f"{line}); keep one of them.")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _check_expansion(data, limit: int, path: str) -> None:
    """Refuse `data` whose nodes, walked as flags would expand them (aliases counted each time), exceed `limit`."""
    budget = limit
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            budget -= 2 * len(value)
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            budget -= 1 + len(value)
            stack.extend(value)
        else:
            budget -= 1 + (len(value) if isinstance(value, (str, bytes)) else 8)
        if budget < 0:
            raise UserError(f"--config {path} expands to more than {MAX_EXPANSION} times its size through YAML aliases "
                            "(&anchor / *alias); write the values out.")


def load_config_text(text: str, path: str):
    """The YAML (or JSON) document of a config file: duplicate keys and alias bombs refused, naming `path`."""
    loader = _ConfigLoader(text)
    loader.source = path
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    _check_expansion(data, MAX_EXPANSION * len(text) + 1024, path)
    return data


def _flag_values(key: str, value, base: Path) -> list[str]:
    """The command-line tokens after `--key` for a config file's value (None when the value means the default)."""
    if value is None or value == []:
        return []
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list):
        return [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
    if isinstance(value, dict):  # accelerator_config, lr_scheduler_kwargs, ...: TrainingArguments reads JSON
        return [json.dumps(value)]
    if key in CONFIG_PATH_KEYS and isinstance(value, str):
        return [_resolve_config_path(value, base)]
    return [str(value)]


def read_config(path: str, parser: HfArgumentParser) -> list[str]:
    """A YAML or JSON file of arguments as the flags it stands for, to go before the command line's (which
    then override them, as `HfArgumentParser` reads an `.args` file). Its keys are checked as
    `HfArgumentParser.parse_dict` checks a dict: each must name a field of the parser's dataclasses, exactly;
    any other is refused in one line naming it (and the field it may mean). Relative input paths
    (`CONFIG_PATH_KEYS`) resolve against the file's own folder when they exist there, so a config and the
    files beside it work from any working directory."""
    kind = "JSON" if path.lower().endswith(".json") else "YAML"
    if not os.path.lexists(path):
        raise UserError(f"--config {path}: no such file; give the path of a {kind} file of arguments.")
    try:  # a FIFO, a device or a folder is refused by read_text, naming what it is
        data = load_config_text(read_text(path, fix=f"give --config a {kind} file"), path) or {}  # JSON is YAML
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid {kind} ({' '.join(str(err).split())}); fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values.")
    known = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    unknown = [str(key) for key in data if str(key) not in known]
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            named.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise UserError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(named)}; a key is "
                        f"a flag's name without -- (`{parser.prog} --help` lists them).")
    base = Path(path).resolve().parent
    argv: list[str] = []
    for key, value in data.items():
        values = _flag_values(str(key), value, base)
        if values:
            argv += [f"--{key}", *values]
    return argv


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The config file (`--config FILE`, `--config=FILE`, or a .yaml/.yml/.json first argument) and the
    other arguments."""
    rest = list(argv)
    found: list[str] = []
    if rest and not rest[0].startswith("-") and rest[0].lower().endswith(CONFIG_SUFFIXES):
        found.append(rest.pop(0))
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise UserError("--config needs a value: --config path/to/file.yaml.")
            found.append(rest[i + 1])
            del rest[i : i + 2]
        elif arg.startswith("--config="):
            if not arg.removeprefix("--config="):
                raise UserError("--config needs a value: --config path/to/file.yaml.")
            found.append(arg.removeprefix("--config="))
            del rest[i]
        else:
            i += 1
    if len(found) > 1:
        raise UserError(f"only one config file is read, got {len(found)} ({', '.join(found)}); merge them or "
                         "override single values with flags.")
    return (found[0] if found else None), rest
