"""Every backbone row of `slca_peft.models.backbones`: LoRA targets by name, save/load and export -> pipeline()
where a stock head reads the same feature (refused with the reason elsewhere). One row per export route
(class token, class token + mean patch, pooler, timm head, refused) also runs 2 tasks with a resume."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft.tuners.lora import LoraLayer
from PIL import Image

from slca_peft import (
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
    export_model,
)
from slca_peft.continual.steps import ReportStep
from slca_peft.models.backbones import attention_linears, class_token, final_norm

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64)
DINO = {k: v for k, v in VIT.items() if k != "intermediate_size"} | {"mlp_ratio": 2}


def timm_config():
    try:  # timm needs a torchvision that matches torch; a mismatched one fails with a RuntimeError
        import timm  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"timm is not usable here ({type(err).__name__}: {err}); install slca-peft[timm]")
    return T.TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0))


# model_type: (config factory, LoRA target names found, final norm path, class token path, export refusal)
ROWS = {
    "vit": (lambda: T.ViTConfig(**VIT, initializer_range=1.0), "layernorm", "embeddings.cls_token", None),
    "deit": (lambda: T.DeiTConfig(**VIT, initializer_range=1.0), "layernorm", "embeddings.cls_token", None),
    "dinov2": (lambda: T.Dinov2Config(**DINO, initializer_range=1.0), "layernorm", "embeddings.cls_token", None),
    "dinov2_with_registers": (lambda: T.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2, initializer_range=1.0),
                              "layernorm", "embeddings.cls_token", None),
    "clip_vision_model": (lambda: T.CLIPVisionConfig(**VIT, initializer_range=1.0), "post_layernorm",
                          "embeddings.class_embedding", "CLIPForImageClassification averages the patch tokens"),
    "siglip_vision_model": (lambda: T.SiglipVisionConfig(**VIT), "post_layernorm", None,
                            "SiglipForImageClassification averages the patch tokens"),
    "beit": (lambda: T.BeitConfig(**VIT, use_mean_pooling=True, initializer_range=1.0), "pooler.layernorm",
             "embeddings.cls_token", None),
    "swin": (lambda: T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=4, initializer_range=1.0), "layernorm", None, None),
    "timm_wrapper": (timm_config, "timm_model.norm", "timm_model.cls_token", None),
}
TARGETS = {name: {"q_proj", "k_proj", "v_proj", "fc1", "fc2"} for name in ROWS}
TARGETS["timm_wrapper"] = {"qkv", "fc1", "fc2"}


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


pytestmark = pytest.mark.usefixtures("frozen_gc")


#: Two tasks of two classes, one epoch; alignment at the training learning rate (`ca_lr` unset).
SETTINGS = dict(num_train_epochs=1, per_device_train_batch_size=8, learning_rate=0.05, ca_lr=None, seed=0,
                ca_samples_per_class=16, ca_batch_size=16, ca_epochs=1, init_cls=2, increment=2,
                per_device_eval_batch_size=8)


def _tasks(folders):
    return TaskSequence.from_image_folders(*folders, init_cls=2, increment=2, seed=1993)


@pytest.mark.parametrize("model_type", list(ROWS))
def test_backbone_row_targets_norm_and_class_token(model_type):
    make, norm, token, _ = ROWS[model_type]
    backbone = T.AutoModel.from_config(make())
    assert backbone.config.model_type == model_type
    assert _get(backbone, norm) is final_norm(backbone)
    assert class_token(backbone) is (None if token is None else _get(backbone, token))
    projections = attention_linears(backbone)
    assert set(projections) == ({"qkv"} if model_type == "timm_wrapper" else {"q_proj", "k_proj", "v_proj"})
    assert all(len(names) >= 2 for names in projections.values())  # one per block
    model = SLCAModel(backbone)
    found = {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert found == TARGETS[model_type]
    if token is not None:  # Hybrid-SL trains the class token
        assert _get(model.base_backbone, token).requires_grad


#: One backbone per export route: these train end to end; the other rows share their code paths.
FAMILIES = ["vit", "dinov2", "beit", "timm_wrapper", "clip_vision_model"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_two_tasks_save_load_resume_and_export(model_type, tmp_path, tiny_image_folders, make_learner):
    make, _, _, refusal = ROWS[model_type]
    torch.manual_seed(0)
    base = tmp_path / "base"
    T.AutoModel.from_config(make()).save_pretrained(base)
    x = torch.randn(3, 3, 32, 32)
    # Task 1, then a fresh process resumes from its checkpoint with the same backbone state and learns task 2.
    first = make_learner(_tasks(tiny_image_folders), tmp_path / "run", base_model=base, **SETTINGS)
    first.remove_callback(ReportStep)  # no plots: not under test
    first.learn_task(first.tasks[0])
    learner = make_learner(_tasks(tiny_image_folders), tmp_path / "run", resume_from=str(tmp_path / "run" / "task_1"),
                           **SETTINGS)
    learner.remove_callback(ReportStep)
    with torch.no_grad():
        torch.testing.assert_close(learner.model.eval().features(x), first.model.eval().features(x))
    result = learner.run()
    assert [len(row) for row in result.accuracy_matrix] == [1, 2]
    assert result.accuracy_matrix[0] == first.result.accuracy_matrix[0]
    _check_save_load_and_export(learner.model.eval(), tmp_path, refusal)


@pytest.mark.parametrize("model_type", [m for m in ROWS if m not in FAMILIES])
def test_save_load_and_export_of_a_trained_model(model_type, tmp_path):
    """The rows without a run of their own: a model with two task heads and every trainable weight moved
    off its initial value (LoRA's B starts at zero) survives save/load and export like a trained one."""
    make, _, _, refusal = ROWS[model_type]
    torch.manual_seed(0)
    T.AutoModel.from_config(make()).save_pretrained(tmp_path / "base")  # checkpoints reference their base
    model = SLCAModel.from_backbone(str(tmp_path / "base"))
    model.grow(2)
    model.grow(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    _check_save_load_and_export(model.eval(), tmp_path, refusal)


def _check_save_load_and_export(model, tmp_path, refusal):
    x = torch.randn(3, 3, 32, 32)
    # save -> from_pretrained -> the same logits
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = SLCAModel.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)

    # export -> pipeline() predicts what the continual model predicts (or a refusal with the reason)
    names = ["a", "b", "c", "d"]
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            export_model(model, str(tmp_path / "exported"), label_names=names)
        assert not (tmp_path / "exported").exists()
        return
    export_model(model, str(tmp_path / "exported"), label_names=names)
    plain = T.AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        # Output k of the export is class id k, as the model's output k.
        torch.testing.assert_close(plain(pixel_values=x).logits, model(x).logits,
                                   rtol=1e-4, atol=1e-4)
    images = [Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()) for _ in range(3)]
    pipe = T.pipeline("image-classification", model=str(tmp_path / "exported"), device="cpu")
    predicted = [r[0]["label"] for r in pipe(images, top_k=1)]
    pixels = T.AutoImageProcessor.from_pretrained(tmp_path / "exported")(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert predicted == [names[i] for i in model(pixels).logits.argmax(1).tolist()]


def test_a_whole_clip_checkpoint_gives_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    config = T.CLIPConfig(vision_config=dict(VIT), text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                      num_attention_heads=4, intermediate_size=64))
    T.CLIPModel(config).save_pretrained(tmp_path / "clip")
    model = SLCAModel.from_backbone(str(tmp_path / "clip"))
    assert type(model.base_backbone).__name__ == "CLIPVisionModel" and model.feature_dim == 32
    assert type(SLCAModel.from_backbone(config).base_backbone).__name__ == "CLIPVisionModel"
    model.grow(2)
    model.save_pretrained(str(tmp_path / "ckpt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(SLCAModel.from_pretrained(str(tmp_path / "ckpt"))(x).logits, model(x).logits)


def test_a_timm_backbone_without_pooling_is_refused():
    config = timm_config()
    config.do_pooling = False
    with pytest.raises(ValueError, match="do_pooling=False.*set config.do_pooling=True"):
        SLCAModel.from_backbone(config)


def test_the_input_size_is_the_processors_crop():
    dinov2 = T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                 do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    config = ImageTransformConfig.from_image_processor(dinov2)
    assert (config.size, config.mean, config.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    vit = T.ViTImageProcessor(size={"height": 384, "width": 384})
    assert ImageTransformConfig.from_image_processor(vit).size == 384
    timm_config()  # skips without timm
    processor = T.TimmWrapperImageProcessor(pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3],
                                                            "std": [0.5, 0.5, 0.5], "crop_pct": 1.0})
    config = ImageTransformConfig.from_image_processor(processor)
    assert (config.size, config.mean, config.std) == (32, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("model_type", ["clip_vision_model", "beit", "timm_wrapper"])
def test_released_code_setting_through_the_table(model_type):
    make, norm, _, _ = ROWS[model_type]
    torch.manual_seed(0)
    backbone = T.AutoModel.from_config(make())
    with torch.no_grad():
        _get(backbone, norm).weight.fill_(3.0)  # a pre-trained norm the reset must replace
    model = SLCAModel(backbone, **{k: v for k, v in vars(SLCAConfig(output_dir="x", released_code=True)).items()
                                   if k in ("lora_target_modules", "lora_layout", "reset_final_norm")})
    found = {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert found == ({"qkv"} if model_type == "timm_wrapper" else {"q_proj", "k_proj", "v_proj"})
    fresh = final_norm(model.base_backbone)
    assert torch.equal(fresh.weight, torch.ones_like(fresh.weight)) and fresh.eps == 1e-5
    assert fresh.weight.requires_grad
