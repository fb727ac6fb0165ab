"""Model files that load anywhere: portable base names, validated configs, no pickle on load."""

import json
import shutil
import textwrap

import pytest
import torch
from conftest import python_forked
from peft import PeftModel
from transformers import AutoModel

from slca_peft import SLCAModel
from slca_peft.continual import load_checkpoint, save_checkpoint
from slca_peft.models.config import SLCAModelConfig


def small_model(base_dir) -> SLCAModel:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_dir))
    model.grow(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


# Plain PEFT, as a user calls it (outside the library's filter of transformers' rename warning).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_plain_peft_loads_the_adapter_from_another_working_directory(tmp_path, base_model_dir, monkeypatch):
    base = tmp_path / "bases" / "tiny"
    shutil.copytree(base_model_dir, base)
    monkeypatch.chdir(tmp_path)
    model = small_model("bases/tiny")  # a relative path, as typed on a command line
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("slca_config.json", "adapter_config.json"):
        assert json.loads((tmp_path / "ckpt" / name).read_text())["base_model_name_or_path"] == str(base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recorded = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(recorded), tmp_path / "ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(peft_model(pixel_values=x).last_hidden_state[:, 0], model.features(x))
    torch.testing.assert_close(SLCAModel.from_pretrained(tmp_path / "ckpt").eval()(x).logits, model(x).logits)


def test_a_moved_base_model_is_named_with_the_fix_and_found_where_the_caller_points(tmp_path, base_model_dir):
    base = tmp_path / "bases" / "tiny"
    shutil.copytree(base_model_dir, base)
    model = small_model(str(base))
    save_checkpoint(model, tmp_path / "ckpt", state={"accuracy_matrix": [[50.0]], "label_names": ["a", "b"]})
    assert json.loads((tmp_path / "ckpt" / "slca_config.json").read_text())["base_model_name_or_path"] == str(base)
    shutil.move(base, tmp_path / "moved")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match=f"'{base}', which does not exist.*--model_name_or_path"):
        load_checkpoint(tmp_path / "ckpt")
    # Passing the base model's location (what --model_name_or_path does on resume) loads it.
    loaded = load_checkpoint(tmp_path / "ckpt", expected_base=str(tmp_path / "moved"))[0].eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.label_names == ["a", "b"]


def test_a_base_folder_holding_only_a_pickle_is_refused_unopened(tmp_path, base_model_dir, exploit):
    import pickle

    payload, marker = exploit
    base = tmp_path / "pickled-base"
    base.mkdir()
    shutil.copy(base_model_dir / "config.json", base / "config.json")
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"no safetensors weights \(only \['pytorch_model.bin'\]\).*never opens"):
        SLCAModel.from_backbone(str(base))
    assert not marker.exists()


def test_config_fields_are_checked_and_round_trip():
    config = SLCAModelConfig(base_model_name_or_path="me/base", task_sizes=[2, 3], feature_dim=32, label_names=["a"])
    assert SLCAModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in [
        ({"lora_rank": 0}, r"lora_rank must be in \[1, 4096\]"),
        ({"lora_rank": 2.0}, "lora_rank must be an integer"),
        ({"use_lora": "yes"}, "use_lora must be true or false"),
        ({"task_sizes": [2, True]}, r"task_sizes\[1\] must be an integer"),
        ({"lora_scale": float("nan")}, "lora_scale must be a finite number"),
        ({"surprise": 1}, r"unknown field\(s\) \['surprise'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            SLCAModelConfig.from_dict({**config.to_dict(), **bad})


CRAFTED = [
    ("lora_rank", 50_000_000, r"lora_rank must be in \[1, 4096\], got 50000000"),
    ("task_sizes", [2, 2, 2e9], r"task_sizes\[2\] must be an integer, got 2000000000.0"),
    ("task_sizes", [900_000, 900_000], "add up to 1800000 classes"),
    ("feature_dim", 10**9, r"feature_dim must be in \[1, 65536\]"),
]


@pytest.mark.slow
def test_a_crafted_config_is_refused_before_anything_is_allocated(tmp_path, base_model_dir):
    import re

    model = small_model(base_model_dir)
    folders = []
    for i, (field, value, _) in enumerate(CRAFTED):
        folder = save_checkpoint(model, tmp_path / f"ckpt{i}")
        config = json.loads((folder / "slca_config.json").read_text())
        config[field] = value
        (folder / "slca_config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    # Under an address-space cap of 2 GiB above what the process holds, allocating what a file asks for would
    # raise MemoryError.
    script = textwrap.dedent(f"""
        import resource
        import slca_peft.models.model
        with open("/proc/self/status") as fh:
            used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (used + 2 * 2**30, resource.RLIM_INFINITY))
        for folder in {folders!r}:
            try:
                slca_peft.continual.load_checkpoint(folder)
                print("LOADED")
            except ValueError as err:
                print("REFUSED", str(err).replace("\\n", " "))
            except MemoryError:
                print("ALLOCATED")
    """)
    out = python_forked(script)
    lines = out.stdout.splitlines()
    assert len(lines) == len(CRAFTED), out.stdout + out.stderr[-2000:]
    for line, (_, _, message) in zip(lines, CRAFTED, strict=True):
        assert line.startswith("REFUSED") and "slca_config.json" in line and re.search(message, line), line


def test_a_damaged_task_history_is_refused_naming_the_field(tmp_path, base_model_dir):
    model = small_model(base_model_dir)
    save_checkpoint(model, tmp_path / "ckpt", state={"accuracy_matrix": [[50.0]], "class_order": [0, 1]})
    path = tmp_path / "ckpt" / "continual_state.json"
    cases = [("accuracy_matrix", [[150.0]], r"accuracy_matrix\[0\]\[0\] must be in \[0.0, 100.0\]"),
             ("class_order", [0, "1"], r"class_order\[1\] must be an integer"),
             ("label_names", "ab", "label_names must be a list")]
    for field, value, message in cases:
        state = json.loads(path.read_text())
        state[field] = value
        path.write_text(json.dumps(state))
        with pytest.raises(ValueError, match=f"continual_state.json: {message}"):
            load_checkpoint(tmp_path / "ckpt")
        state.pop(field)
        state.setdefault("accuracy_matrix", [[50.0]])
        path.write_text(json.dumps(state))


def test_a_missing_checkpoint_that_looks_like_a_repo_id_is_named(tmp_path, monkeypatch):
    from slca_peft.continual import load_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="outputs/nope is neither a local checkpoint directory nor a Hub repo"):
        load_checkpoint("outputs/nope")


@pytest.mark.parametrize("text", ["[]", '{"image_processor_type": 5}', '{"processor_class": ["x"]}',
                                  '{"image_processor_type": "NoSuchImageProcessor"}', "{not json"])
def test_a_damaged_processor_file_is_refused_in_one_line_naming_it(tmp_path, base_model_dir, text):
    from slca_peft.artifacts.layout import PROCESSOR_FILE
    from slca_peft.utils.errors import UserError

    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / PROCESSOR_FILE).write_text(text)
    with pytest.raises(UserError, match=PROCESSOR_FILE) as err:
        SLCAModel.from_pretrained(tmp_path / "m")
    assert "\n" not in str(err.value)
