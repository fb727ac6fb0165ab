"""Every YAML in recipes/configs parses into SLCAConfig through recipes/train_seq.py and, for the published
settings, carries the paper's numbers and those of the authors' released configs (`exps/`); every published
config has a `*_released.yaml` twin in the released code's setting."""

import dataclasses

import pytest
import yaml
from conftest import ROOT

from slca_peft.method import AlignmentSettings
from slca_peft.utils.errors import UserError

CONFIGS = ROOT / "recipes" / "configs"

# benchmark: (init_cls, increment, IN21K epochs, sce_alpha, sce_beta, SLCA++ weight decay, CA temperature)
BENCHMARKS = {
    "cifar100": (10, 10, 20, 1.0, 0.1, 5e-4, 0.1),
    "imagenet_r": (20, 20, 50, 0.5, 0.5, 0.0, 0.1),
    "cub200": (20, 20, 50, 1.0, 0.1, 5e-4, 0.1),
    "cars196": (20, 20, 50, 0.5, 0.5, 0.0, 0.05),
}
BACKBONES = {"in21k": "google/vit-base-patch16-224-in21k", "mocov3": "checkpoints/mocov3-vit-base-hf"}
METHODS = ("slca++", "slca")
PUBLISHED = [(b, bb, m) for b in BENCHMARKS for bb in BACKBONES for m in METHODS]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses_into_the_values_it_lists(recipe, path):
    """Each YAML key reaches the argument it names with its value: none is dropped, retyped or overridden."""
    model_args, data_args, args = recipe.parse_args(["--config", str(path)])
    listed = yaml.safe_load(path.read_text())
    assert {"model_name_or_path", "dataset", "method", "output_dir"} <= set(listed)
    for key, value in listed.items():
        (owner,) = [o for o in (model_args, data_args, args) if key in {f.name for f in dataclasses.fields(o)}]
        parsed = getattr(owner, key)
        parsed = getattr(parsed, "value", parsed)  # enum-valued TrainingArguments fields
        if isinstance(value, str) and (path.parent / value).exists():
            value = str((path.parent / value).resolve())  # a relative path resolves next to its config
        assert parsed == (pytest.approx(value) if isinstance(value, float) else value), key


def test_all_published_settings_have_a_config():
    missing = [f"{b}_{bb}_{m}.yaml" for b, bb, m in PUBLISHED if not (CONFIGS / f"{b}_{bb}_{m}.yaml").is_file()]
    assert not missing


@pytest.mark.parametrize(("benchmark", "backbone", "method"), PUBLISHED, ids=lambda v: str(v))
def test_published_config_matches_the_paper(recipe, benchmark, backbone, method):
    path = CONFIGS / f"{benchmark}_{backbone}_{method}.yaml"
    model_args, data_args, args = recipe.parse_args(["--config", str(path)])
    init_cls, increment, in21k_epochs, alpha, beta, weight_decay, tau = BENCHMARKS[benchmark]
    assert model_args.model_name_or_path == BACKBONES[backbone]
    assert data_args.dataset == benchmark and args.method == method
    assert (args.init_cls, args.increment, args.class_order_seed) == (init_cls, increment, 1993)
    assert args.num_train_epochs == (in21k_epochs if backbone == "in21k" else 90)
    assert (args.learning_rate, args.per_device_train_batch_size, args.momentum) == (0.01, 128, 0.9)
    assert args.weight_decay == (weight_decay if method == "slca++" else 5e-4)
    assert (args.sce_alpha, args.sce_beta) == (alpha, beta)
    assert (args.ca_epochs, args.ca_samples_per_class, args.ca_batch_size) == (5, 256, 256)
    assert AlignmentSettings.from_config(args).lr == 0.01  # ca_lr unset: the training rate
    assert (args.ca_temperature, args.fc_scale_mu, args.ca_ridge) == (tau, 0.02, 1e-4)
    assert args.backbone_lr_scale == {"slca++": 0.1, "slca": 0.01}[method]
    assert args.use_lora == (method == "slca++") and args.use_sce == (method == "slca++") and args.align
    assert (args.lora_rank, args.lora_scale, args.first_task_lora_lr_scale) == (4, 0.8, 0.5)
    # Cosine floor 0.1**len(milestones): two milestones in the released `exps/slcapp/*_mocov3.json`, else one.
    assert args.lr_floor_decay == pytest.approx(0.01 if (method, backbone) == ("slca++", "mocov3") else 0.1)
    assert data_args.brightness_jitter == pytest.approx(63 / 255 if benchmark == "cifar100" else 0.0)
    if not path.name.startswith("cifar100_in21k"):  # the older CIFAR-100 IN21K configs run one seed
        assert data_args.seeds == [1993, 1996, 1997]
    if backbone == "mocov3":
        assert "slca-peft convert" in path.read_text()
    # The released `utils/data.py` augmentation of CUB-200 and Cars-196: Resize(300x300) + RandomCrop(224).
    assert data_args.train_resize == (300 if benchmark in ("cub200", "cars196") else None)


PAPER_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.endswith("_released.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_released_twin_differs_only_by_the_released_setting(recipe, path):
    twin = path.with_name(f"{path.stem}_released.yaml")
    assert twin.is_file(), f"{twin.name} is missing"
    model_args, data_args, args = recipe.parse_args(["--config", str(path)])
    twin_model, twin_data, twin_args = recipe.parse_args(["--config", str(twin)])
    assert not args.released_code and twin_args.released_code
    assert (args.lora_layout, args.reset_final_norm) == ("per_projection", False)
    assert "fc1" in args.lora_target_modules and "fc2" in args.lora_target_modules
    # The released code: one fused-qkv adapter, no MLP LoRA, a fresh final LayerNorm, CA at the training rate.
    assert (twin_args.lora_layout, twin_args.reset_final_norm, twin_args.final_norm_eps) == ("fused_qkv", True, 1e-5)
    assert twin_args.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert twin_args.ca_lr is None and AlignmentSettings.from_config(twin_args).lr == twin_args.learning_rate
    assert twin_model == model_args and twin_data == data_args
    released_fields = {"released_code", "lora_target_modules", "lora_layout", "reset_final_norm", "output_dir",
                       "logging_dir"}
    ours, theirs = args.to_dict(), twin_args.to_dict()
    assert {k for k in ours if ours[k] != theirs[k]} <= released_fields
    assert twin_args.output_dir != args.output_dir


def test_seeds_from_a_config_are_overridden_on_the_command_line(recipe):
    path = CONFIGS / "cub200_in21k_slca++.yaml"
    _, data_args, args = recipe.parse_args(["--config", str(path), "--seeds", "1996", "--data_dir", "/data/cub"])
    assert data_args.seeds == [1996] and data_args.data_dir == "/data/cub"


def test_train_resize_and_a_random_resized_crop_scale_are_not_combined(recipe):
    path = CONFIGS / "cub200_in21k_slca++.yaml"
    with pytest.raises(UserError, match="--crop_scale_min sets RandomResizedCrop, which --train_resize replaces"):
        recipe.parse_args(["--config", str(path), "--crop_scale_min", "0.5"])
    _, data_args, _ = recipe.parse_args(["--config", str(path), "--crop_scale_min", "0.5", "--train_resize", "0"])
    assert not data_args.train_resize and data_args.crop_scale_min == 0.5


def test_every_slca_config_field_is_documented():
    from transformers import TrainingArguments

    from slca_peft import SLCAConfig

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(SLCAConfig) if f.name not in inherited]
    for doc in ("method.md", "recipes.md"):
        text = (ROOT / "docs" / doc).read_text()
        assert [name for name in own if f"`{name}`" not in text and f"`--{name}`" not in text] == [], doc


OTHER_BACKBONES = {"dinov2": "facebook/dinov2-base", "clip": "openai/clip-vit-base-patch16"}


@pytest.mark.parametrize(("benchmark", "backbone"), [(b, bb) for b in BENCHMARKS for bb in OTHER_BACKBONES],
                         ids=lambda v: str(v))
def test_other_backbone_configs_keep_the_benchmark_setting(recipe, benchmark, backbone):
    path = CONFIGS / f"{benchmark}_{backbone}_slca++.yaml"
    model_args, data_args, args = recipe.parse_args(["--config", str(path)])
    _, _, reference = recipe.parse_args(["--config", str(CONFIGS / f"{benchmark}_in21k_slca++.yaml")])
    assert model_args.model_name_or_path == OTHER_BACKBONES[backbone]
    assert "not run here: needs pre-trained weights and a gpu" in path.read_text().lower()
    assert "image processor" in path.read_text().lower()
    same = ("method", "init_cls", "increment", "num_train_epochs", "learning_rate", "weight_decay", "sce_alpha",
            "sce_beta", "ca_epochs", "ca_temperature", "fc_scale_mu", "lora_rank", "lora_scale", "lr_floor_decay")
    assert {k: getattr(args, k) for k in same} == {k: getattr(reference, k) for k in same}
    assert data_args.seeds == [1993, 1996, 1997] and data_args.dataset == benchmark
