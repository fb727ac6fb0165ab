"""Every number and pattern of a PEFT config read from a file is bounded before it is used: size fields by the
backbone's shapes, NaN and infinity, backtracking regexes."""

import json
from pathlib import Path

import pytest
from conftest import python_forked
from peft import LoHaConfig, LoKrConfig, LoraConfig, VBLoRAConfig

import slca_peft.models.adapters as adapters
from slca_peft.models.adapters import load_peft_config
from slca_peft.models.config import SLCAModelConfig
from slca_peft.models.model import SLCAModel
from slca_peft.models.peft_limits import check_pattern

BOMBS_UNDER_CAP = """
import json, resource, sys
from transformers import ViTConfig
from slca_peft.models.adapters import load_peft_config
from slca_peft.models.model import SLCAModel
from slca_peft.models.config import SLCAModelConfig
config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64)
with open("/proc/self/status") as fh:
    used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
for path in sys.argv[1:]:
    data = json.loads(open(path).read())
    try:
        if "use_lora" in data:  # an slca_config.json
            SLCAModelConfig.from_dict(data, path)
        else:
            SLCAModel.from_backbone(config, peft_config=load_peft_config(path), lora_svd_init=False)
    except ValueError as err:
        print("REFUSED", " ".join(str(err).split()))
    except MemoryError:
        print("ALLOCATED", path)
"""

SLCA_CONFIG = {"use_lora": True, "lora_rank": 4, "lora_scale": 0.8, "lora_target_modules": ["q_proj"],
               "task_sizes": [2], "feature_dim": 32}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peft_size_bombs_are_refused_under_an_address_space_cap(tmp_path):
    bombs = {  # each would allocate 4-16 GB
        "lora_rank_pattern.json": LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 50_000_000}),
        "loha_rank_pattern.json": LoHaConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 3000}),
        "vblora_bank.json": VBLoRAConfig(r=4, target_modules=["q_proj"], num_vectors=1 << 30, vector_length=4),
        "lokr_factor.json": LoKrConfig(r=4, target_modules=["q_proj"], decompose_factor=1 << 20),
    }
    paths = []
    for name, config in bombs.items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(config.to_dict(), default=list))
    slca = tmp_path / "slca_config.json"
    slca.write_text(json.dumps({**SLCA_CONFIG, "peft_config": {**LoraConfig().to_dict(), "peft_type": "LORA",
                                                               "target_modules": ["q_proj"],
                                                               "rank_pattern": {"q_proj": 10**9}}}, default=list))
    proc = python_forked(BOMBS_UNDER_CAP, *map(str, paths + [slca]))
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("REFUSED") for line in lines), proc.stdout + proc.stderr[-2000:]
    assert "peft_config.rank_pattern['q_proj'] must be in [1, 4096], got 50000000" in lines[0]
    assert "rank_pattern['q_proj'] must be in [0, 32] (the largest rank of a weight of ViTModel)" in lines[1]
    assert "num_vectors x vector_length = 1073741824 x 4" in lines[2]
    assert "decompose_factor must be in [-1, 65536], got 1048576" in lines[3]
    assert str(slca) in lines[4] and "rank_pattern['q_proj']" in lines[4]


@pytest.mark.parametrize("config, field", [
    (LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 33}), r"rank_pattern\['q_proj'\]"),
    (LoHaConfig(r=64, target_modules=["q_proj"]), r"peft_config.r must be in \[0, 32\]"),
    (LoKrConfig(r=4, target_modules=["q_proj"], decompose_factor=193), r"decompose_factor must be in \[-1, 192\]"),
    (VBLoRAConfig(r=4, target_modules=["q_proj"], num_vectors=100_000, vector_length=4), "vector bank larger"),
    (LoraConfig(r=4, target_modules=["q_proj"], alpha_pattern={"q_proj": float("inf")}), "must be a finite number"),
    (LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=float("nan")), "lora_dropout must be a finite number"),
])
def test_sizes_are_bounded_by_the_backbone_before_peft_is_called(vit_config, monkeypatch, config, field):
    def unreachable(*args, **kwargs):
        raise AssertionError("get_peft_model was called")

    monkeypatch.setattr(adapters, "get_peft_model", unreachable)
    with pytest.raises(ValueError, match=field):
        SLCAModel.from_backbone(vit_config, peft_config=config, lora_svd_init=False)


def test_sizes_within_the_backbone_still_build(vit_config):
    model = SLCAModel.from_backbone(vit_config, lora_svd_init=False, peft_config=LoraConfig(
        r=4, target_modules=["q_proj", "fc1"], rank_pattern={"fc1": 32}, alpha_pattern={"fc1": 16}))
    fc1 = next(m for n, m in model.backbone.named_modules() if n.endswith("0.mlp.fc1"))
    assert fc1.lora_A["default"].weight.shape == (32, 32) and fc1.scaling["default"] == 0.5


def test_nan_in_a_peft_config_file_or_slca_config_names_the_field(tmp_path):
    path = tmp_path / "lora.json"
    path.write_text('{"peft_type": "LORA", "r": NaN, "target_modules": ["q_proj"]}')
    with pytest.raises(ValueError, match=rf"peft_config file {path}: peft_config.r must be a finite number, got nan"):
        load_peft_config(path)
    path.write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity, "target_modules": ["q_proj"]}')
    with pytest.raises(ValueError, match=r"peft_config.lora_alpha must be a finite number, got inf"):
        load_peft_config(path)
    data = {**SLCA_CONFIG, "peft_config": {"peft_type": "LORA", "r": float("nan")}}
    with pytest.raises(ValueError, match=r"^slca_config.json: peft_config.r must be a finite number, got nan"):
        SLCAModelConfig.from_dict(data)


BACKTRACKING = ["(.*)*x", "(a|ab)*c", "(a?){12}a{12}", r"(.)\1", ".*.*.*.*.*.*.*.*x", "(x+x+)+y"]

REGEXES_UNDER_TIMEOUT = """
import sys
from peft import LoraConfig
from transformers import ViTConfig
from slca_peft.models.model import SLCAModel
config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64)
for pattern in sys.argv[1:]:
    for fields in ({"target_modules": pattern}, {"target_modules": ["q_proj"], "rank_pattern": {pattern: 2}},
                   {"target_modules": ["q_proj"], "exclude_modules": pattern},
                   {"target_modules": ["q_proj"], "modules_to_save": [pattern]}):
        try:
            SLCAModel.from_backbone(config, peft_config=LoraConfig(r=2, **fields), lora_svd_init=False)
            print("BUILT", pattern)
        except ValueError as err:
            print("REFUSED", err)
model = SLCAModel.from_backbone(config, peft_config=LoraConfig(r=2, target_modules=r".*\\.(q_proj|v_proj)"),
                                lora_svd_init=False)
print("SAFE", sorted(model.backbone.peft_config["default"].target_modules))
"""


@pytest.mark.slow
def test_backtracking_regexes_are_refused_within_a_time_limit():
    proc = python_forked(REGEXES_UNDER_TIMEOUT, *BACKTRACKING, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 * len(BACKTRACKING) + 1, proc.stdout + proc.stderr[-2000:]
    assert all(line.startswith("REFUSED") and "can make regex matching take hours" in line for line in lines[:-1])
    assert "peft_config.rank_pattern key '(.*)*x'" in lines[1] and "peft_config.modules_to_save entry" in lines[3]
    assert lines[-1].startswith("SAFE")


def test_pattern_rules_accept_ordinary_module_patterns():
    for pattern in [r".*\.(q_proj|v_proj)", r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
                    r"encoder\.layer\.\d+\.attention\..*", "q_proj"]:
        assert check_pattern("p", pattern) == pattern
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        check_pattern("p", "(q_proj")
