"""`--config` files are data from anywhere: read bounded, a key given twice refused, aliases that expand
a few hundred bytes into gigabytes refused before any value is turned into a flag."""

import os
from pathlib import Path

import pytest
from conftest import python_forked

from slca_peft.utils.errors import UserError

BASE = "model_config: m.json\ndataset: digits\noutput_dir: out\n"


def alias_bomb(levels: int, key: str, mapping: bool = False) -> str:
    """A YAML file of a few hundred bytes whose one value (a flag's) expands to 9**levels strings."""
    items = ['&l0 ["x","x","x","x","x","x","x","x","x"]']
    items += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    if mapping:
        items = [f"k{i}: {item}" for i, item in enumerate(items)]
        return BASE + f"{key}: {{" + ", ".join(items) + "}\n"
    return BASE + f"{key}: [" + ", ".join(items) + "]\n"


PARSE_UNDER_CAP = """
import resource, sys
from slca_peft.commands import recipe
from slca_peft.utils.errors import UserError
with open("/proc/self/status") as fh:
    used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for path in sys.argv[1:]:
    try:
        recipe.parse_args([path])
        print("PARSED", path)
    except UserError as err:
        print("REFUSED", " ".join(str(err).split()))
    except MemoryError:
        print("ALLOCATED", path)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_yaml_alias_bombs_are_refused_under_an_address_space_cap(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    paths = []
    # A list flag and a mapping flag: each expands through str(v) / json.dumps(v) into gigabytes.
    for name, key in (("list.yaml", "lora_target_modules"), ("dict.yaml", "lr_scheduler_kwargs")):
        text = alias_bomb(9, key, mapping=key == "lr_scheduler_kwargs")
        assert len(text) < 800
        paths.append(tmp_path / name)
        paths[-1].write_text(text)
    proc = python_forked(PARSE_UNDER_CAP, *map(str, paths), cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED") and "YAML aliases" in line for line in lines), \
        proc.stdout + proc.stderr[-2000:]


def test_a_key_given_twice_is_refused_naming_both_lines(recipe, tmp_path):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "twice.yaml").write_text(BASE + "learning_rate: 0.1\nseed: 1\nlearning_rate: 0.5\n")
    with pytest.raises(UserError, match=r"twice.yaml: key 'learning_rate' is given twice \(lines 4 and 6\)"):
        recipe.parse_args([str(tmp_path / "twice.yaml")])
    (tmp_path / "twice.json").write_text('{"model_config": "m.json", "dataset": "digits", "output_dir": "out", '
                                         '"seed": 1, "seed": 2}')
    with pytest.raises(UserError, match="twice.json: key 'seed' is given twice"):
        recipe.parse_args(["--config", str(tmp_path / "twice.json")])
    # Anchors used as YAML means them (a merge key overridden, an alias) still work.
    (tmp_path / "merge.yaml").write_text(BASE + "learning_rate: &lr 0.25\nca_lr: *lr\n")
    _, _, args = recipe.parse_args([str(tmp_path / "merge.yaml")])
    assert (args.learning_rate, args.ca_lr) == (0.25, 0.25)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_config_that_is_not_a_regular_file_is_named_for_what_it_is(recipe, tmp_path, kind):
    path = tmp_path / "args.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    expected = {"fifo": "is a FIFO", "directory": "is a directory", "device": "is a device"}[kind]
    with pytest.raises(UserError, match=f"args.yaml {expected}"):
        recipe.parse_args(["--config", str(path)])
