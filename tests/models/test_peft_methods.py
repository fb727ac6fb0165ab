"""Any PEFT method as the slow learner: a 2-task run, adapter learning-rate roles, save/load with equal
logits, merged export, SVD initialisation where defined, and bad configs refused before training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_vit_config
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PolyConfig, PromptTuningConfig
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForImageClassification, ViTModel

from slca_peft import (
    ContinualLearner,
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
    TrainTransform,
    export_model,
)
from slca_peft.continual.steps import ReportStep
from slca_peft.models.adapters import ADAPTER, BACKBONE

METHODS = {
    "dora": (lambda: LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], use_dora=True),
             "lora_", True),
    "rslora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True,
                                  rank_pattern={"k_proj": 2}), "lora_", True),
    "loha": (lambda: LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]), "hada_", False),
    "lokr": (lambda: LoKrConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj", "fc2"]), "lokr_", False),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]), "ia3_",
            False),
}


pytestmark = pytest.mark.usefixtures("frozen_gc")


@pytest.fixture(scope="module")
def two_tasks(tiny_image_folders):
    return TaskSequence.from_image_folders(*tiny_image_folders, init_cls=2, increment=2, seed=1993)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_peft_method_as_slow_learner(method, tmp_path, base_model_dir, two_tasks):
    make_config, prefix, svd = METHODS[method]
    args = SLCAConfig(output_dir=str(tmp_path / "run"), use_cpu=True, num_train_epochs=1, per_device_train_batch_size=8,
                      learning_rate=0.05, seed=0, disable_tqdm=True, report_to="none", ca_epochs=1,
                      ca_samples_per_class=16, ca_batch_size=16, init_cls=2, increment=2, lora_svd_init=svd)
    model = SLCAModel.from_backbone(str(base_model_dir), args, peft_config=make_config())
    roles = {n: model.parameter_role(n) for n, p in model.named_parameters() if p.requires_grad}
    adapter = [n for n, r in roles.items() if r == ADAPTER]
    assert adapter and all(prefix in n for n in adapter)
    assert all(prefix not in n for n, r in roles.items() if r != ADAPTER)
    assert any(r == BACKBONE and "layernorm" in n for n, r in roles.items())  # Hybrid-SL norms beside it
    assert any(r == BACKBONE and n.endswith("cls_token") for n, r in roles.items())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in adapter}

    tc = ImageTransformConfig.from_model_config(model.config)
    learner = ContinualLearner(model, args, two_tasks, train_transform=TrainTransform(tc, flip_p=0.0),
                               eval_transform=EvalTransform(tc))
    learner.remove_callback(ReportStep)  # no plots: not under test
    result = learner.run()
    assert [len(row) for row in result.accuracy_matrix] == [1, 2]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)  # adapter trained

    # The checkpoint records the PEFT config; from_pretrained rebuilds it and gives the same logits.
    saved = json.loads((tmp_path / "run" / "task_2" / "slca_config.json").read_text())
    assert saved["peft_config"]["peft_type"] == make_config().peft_type.value
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = SLCAModel.from_pretrained(str(tmp_path / "saved")).eval()
    assert type(loaded.peft_config) is type(make_config())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
        # Export merges the adapter into a stock ViT that computes the same logits.
        export_model(model, str(tmp_path / "exported"))
        plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
        # Output k of the export is class id k, as the model's output k.
        torch.testing.assert_close(plain(pixel_values=x).logits, model(x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_svd_initialisation_with_a_dora_config_keeps_the_base_model():
    torch.manual_seed(0)
    plain = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = SLCAModel(copy.deepcopy(plain), peft_config=config).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * 2
    for layer in layers:
        _, _, vh = torch.linalg.svd(layer.get_base_layer().weight.detach(), full_matrices=False)
        torch.testing.assert_close(layer.lora_A["default"].weight.detach(), vh[:4], rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), plain(pixel_values=x).last_hidden_state[:, 0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("config", "svd", "message"), [
    (LoraConfig(target_modules=["q_proj", "classifier"]), False, r"target_modules names 'classifier', the classifier"),
    (LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]), False,
     r"modules_to_save names 'classifier'"),
    (LoraConfig(target_modules=["q_proj", "query"]), False, r"target_modules \['query'\] match no module.*q_proj"),
    (LoraConfig(target_modules=r".*\.attn\.qkv"), False, r"regex '.*\\\\.attn\\\\.qkv' matches no module"),
    (LoHaConfig(target_modules=["q_proj"]), True, "lora_svd_init is defined for LoRA only, not LoHaConfig"),
    (LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"), True, "overwrite.*init_lora_weights='pissa'"),
    (PromptTuningConfig(num_virtual_tokens=4), False, "prompt-learning method"),
], ids=["classifier-target", "classifier-saved", "no-match", "regex-no-match", "svd-loha", "svd-pissa", "prompt"])
def test_bad_peft_configs_are_refused_before_training(vit_config, config, svd, message):
    with pytest.raises(ValueError, match=message):
        SLCAModel.from_backbone(vit_config, peft_config=config, lora_svd_init=svd)


def test_export_of_an_adapter_peft_cannot_merge_is_refused(vit_config, tmp_path):
    model = SLCAModel.from_backbone(vit_config, peft_config=PolyConfig(target_modules=["q_proj"]), lora_svd_init=False)
    model.grow(2)
    with pytest.raises(ValueError, match="PEFT cannot merge this POLY adapter"):
        export_model(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_recipe_reads_a_peft_config_file(recipe, tmp_path, vit_config):
    path = tmp_path / "loha.json"
    path.write_text(json.dumps(LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]).to_dict(), default=list))
    model_args, _, args = recipe.parse_args([
        "--model_config", "unused", "--dataset", "digits", "--output_dir", str(tmp_path / "out"),
        "--peft_config", str(path), "--lora_svd_init", "false"])
    vit_config.save_pretrained(tmp_path / "cfg")
    model_args.model_config = str(tmp_path / "cfg")
    model = recipe.build_model(model_args, args)
    assert isinstance(model.peft_config, LoHaConfig) and model.peft_config.r == 2
    assert {n.split(".hada_w1_a")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "hada_w1_a" in n} == {
        "q_proj", "v_proj"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    model_args.peft_config = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must hold one JSON object"):
        recipe.build_model(model_args, args)


@pytest.mark.parametrize("svd", [True, False])
def test_built_in_lora_is_a_user_lora_config_with_the_same_settings(vit_config, svd):
    """One path: the built-in settings and the LoraConfig they stand for give the same trainable set, the
    same initial weights (from the same seed), the same roles and the same saved adapter config."""
    torch.manual_seed(0)
    built_in = SLCAModel.from_backbone(vit_config, lora_rank=2, lora_scale=1.5, lora_target_modules=["q_proj", "fc2"],
                                       lora_svd_init=svd)
    torch.manual_seed(0)
    user = SLCAModel.from_backbone(vit_config, lora_svd_init=svd, peft_config=LoraConfig(
        r=2, lora_alpha=3.0, target_modules=["q_proj", "fc2"], lora_dropout=0.0, bias="all"))
    trainable = {m: {n for n, p in m.named_parameters() if p.requires_grad} for m in (built_in, user)}
    assert trainable[built_in] == trainable[user] and any("lora_B" in n for n in trainable[user])
    assert [built_in.parameter_role(n) for n in sorted(trainable[built_in])] == \
        [user.parameter_role(n) for n in sorted(trainable[user])]
    ours, theirs = built_in.state_dict(), user.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert built_in.backbone.peft_config["default"].to_dict() == user.backbone.peft_config["default"].to_dict()

