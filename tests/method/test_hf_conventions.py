"""Hugging Face habits: the loading keywords people type, one configuration object everywhere, the
transformers meaning of scheduler names, errors that name the fix, and a quiet DDP wrapper."""

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import tiny_vit_config
from transformers import TrainingArguments, ViTModel
from transformers.training_args import ParallelMode

from slca_peft import ContinualLearner, SLCAConfig, SLCAModel, SLCATrainer, TaskSequence
from slca_peft.data.benchmarks import load_benchmark


def plain_args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, **kw)


def test_from_backbone_takes_the_loading_keywords_and_the_model_settings(base_model_dir, tmp_path, monkeypatch):
    import slca_peft.models.loading as base_model
    from slca_peft.models.loading import loading_kwargs

    seen = {}
    real = base_model.AutoModel.from_pretrained

    def recording(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(base_model.AutoModel, "from_pretrained", recording)
    model = SLCAModel.from_backbone(str(base_model_dir), token="hf_x", cache_dir=str(tmp_path), local_files_only=True,
                                    force_download=False, dtype=torch.bfloat16, released_code=True, lora_rank=2)
    assert {k: seen[k] for k in ("token", "cache_dir", "local_files_only", "force_download", "dtype")} == {
        "token": "hf_x", "cache_dir": str(tmp_path), "local_files_only": True, "force_download": False,
        "dtype": torch.bfloat16}
    assert (model.dtype, model.device) == (torch.bfloat16, torch.device("cpu"))
    # released_code resolves into its knobs as SLCAConfig does; an explicit knob wins.
    config = model.slca_config
    assert (config.lora_layout, config.reset_final_norm, config.lora_rank) == ("fused_qkv", True, 2)
    assert config.lora_target_modules == SLCAConfig(output_dir="x", released_code=True).lora_target_modules
    model.grow(3)
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16)).logits.shape == (2, 3)
    assert SLCAModel.from_backbone(tiny_vit_config(), method="slca").slca_config.use_lora is False
    with pytest.raises(ValueError, match=r"device_map is not supported: .* call model.to\(device\)"):
        SLCAModel.from_backbone(str(base_model_dir), device_map="auto")
    with pytest.raises(TypeError, match="learning_rate is a training setting.*SLCATrainer or ContinualLearner"):
        SLCAModel.from_backbone(tiny_vit_config(), learning_rate=0.1)
    # The same check, reusable by any from_pretrained: torch_dtype is read as dtype, unset ones dropped.
    assert loading_kwargs(token="t", torch_dtype=torch.float16, revision=None) == {"token": "t", "dtype": torch.float16}
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['lora_rank'\]"):
        loading_kwargs(lora_rank=2)


def test_a_plain_training_arguments_is_converted_wherever_an_slca_config_is_taken(tmp_path, caplog):
    plain = plain_args(tmp_path, learning_rate=0.02)
    model = SLCAModel.from_backbone(tiny_vit_config(), plain)  # the model settings' defaults, as SLCAConfig's
    assert model.slca_config.use_lora and model.slca_config.lora_rank == SLCAConfig.lora_rank
    data = datasets.Dataset.from_dict({"image": [torch.zeros(3, 32, 32).tolist()] * 4, "label": [0, 1, 2, 3]})
    learner = ContinualLearner(model, plain, TaskSequence(data, data, init_cls=2, increment=2, seed=None))
    assert isinstance(learner.args, SLCAConfig) and learner.args.learning_rate == 0.02
    assert learner.statistics.ridge == SLCAConfig.ca_ridge


def lrs_over(trainer, steps: int) -> list[float]:
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    seen = []
    for _ in range(steps):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return seen


def test_cosine_means_transformers_cosine_and_slca_cosine_is_the_default(tmp_path, vit_config):
    values = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", num_train_epochs=4, learning_rate=0.01)
    default = SLCAConfig(**values)
    assert default.lr_scheduler_type == "slca_cosine"
    assert SLCAConfig(**default.to_dict()).lr_scheduler_type == "slca_cosine"  # survives the JSON round trip
    model = SLCAModel.from_backbone(vit_config, default)
    model.grow(2)
    floor = 0.01 * 0.1 * 0.1
    epoch_wise = [floor + (0.01 - floor) * (1 + math.cos(math.pi * (s // 2) / 4)) / 2 for s in range(8)]
    assert lrs_over(SLCATrainer(model=model, args=default), 8) == pytest.approx(epoch_wise)
    hf_cosine = SLCAConfig(**values, lr_scheduler_type="cosine")
    per_step = [0.01 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(8)]
    assert lrs_over(SLCATrainer(model=model, args=hf_cosine), 8) == pytest.approx(per_step)
    # A zero learning rate is TrainingArguments' to take; alignment then needs its own rate.
    assert SLCAConfig(**{**values, "learning_rate": 0.0}, ca_lr=0.01).learning_rate == 0.0
    with pytest.raises(ValueError, match="learning_rate=0 leaves classifier alignment at .* set --ca_lr"):
        SLCAConfig(**{**values, "learning_rate": 0.0})


def test_errors_name_the_missing_path_the_checkpoint_and_the_known_datasets(tmp_path, base_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="the backbone path recipes/assets/gone does not exist"):
        SLCAModel.from_backbone("recipes/assets/gone")
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.save_pretrained(tmp_path / "task_0")
    with pytest.raises(ValueError, match=r"is an slca-peft checkpoint.*SLCAModel.from_pretrained.*--resume_from"):
        SLCAModel.from_backbone(str(tmp_path / "task_0"))
    with pytest.raises(ValueError, match=r"did you mean 'digits'\?.*cifar100, imagenet_r, cub200, cars196, digits"):
        load_benchmark("digit")


def test_the_recipe_refuses_a_wrong_backbone_when_parsing_before_any_image_is_read(recipe, tmp_path, base_model_dir):
    base = ["--dataset", "digits", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError, match="the backbone path .*gone does not exist"):
        recipe.parse_args(base + ["--model_name_or_path", str(tmp_path / "gone")])
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.save_pretrained(tmp_path / "task_0")
    with pytest.raises(ValueError, match="is an slca-peft checkpoint, not a base model"):
        recipe.parse_args(base + ["--model_name_or_path", str(tmp_path / "task_0")])


def test_ddp_looks_for_unused_parameters_only_when_some_are(vit_config):
    from slca_peft.method.trainer import ddp_find_unused, unused_trainable_parameters

    model = SLCAModel.from_backbone(vit_config)
    model.grow(2)
    head = model.classifier.heads[0].weight
    head.grad = torch.ones_like(head)
    assert unused_trainable_parameters(model) == []
    assert torch.equal(head.grad, torch.ones_like(head)) and model.training  # gradients and mode restored
    distributed = SimpleNamespace(ddp_find_unused_parameters=None, parallel_mode=ParallelMode.DISTRIBUTED,
                                  gradient_checkpointing=False)
    assert ddp_find_unused(model, distributed) is False  # the Trainer's own choice is True: DDP warns each run
    # Full fine-tuning of a backbone with a mask token: the token gets no gradient, so DDP must look.
    masked = SLCAModel.from_backbone(ViTModel(vit_config, add_pooling_layer=False, use_mask_token=True), method="slca")
    masked.grow(2)
    assert unused_trainable_parameters(masked) == ["backbone.embeddings.mask_token"]
    assert ddp_find_unused(masked, distributed) is True
    assert ddp_find_unused(model, SimpleNamespace(**{**vars(distributed), "ddp_find_unused_parameters": True}))
    assert ddp_find_unused(model, SimpleNamespace(**{**vars(distributed), "parallel_mode": ParallelMode.NOT_PARALLEL}
                                                  )) is None
