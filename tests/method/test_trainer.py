import math

import datasets
import numpy as np
import pytest
import torch

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer


def make_args(tmp_path, **kw) -> SLCAConfig:
    values = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_train_epochs=2,
                  disable_tqdm=True, seed=0, report_to="none")
    values.update(kw)
    return SLCAConfig(**values)


def toy_dataset(labels: list[int], seed: int = 0) -> datasets.Dataset:
    """pixel_values/labels columns: what a user's own image-classification script feeds a Trainer."""
    rng = np.random.RandomState(seed)
    pixels = rng.randn(len(labels), 3, 32, 32).astype(np.float32)
    for i, y in enumerate(labels):
        pixels[i, :, (y % 4) * 8 : (y % 4) * 8 + 8, :] += 3.0  # class-specific band
    return datasets.Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def group_lrs(trainer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in trainer.create_optimizer().param_groups}


def test_learning_rates_of_every_group_on_task_one_and_two(tmp_path, vit_config):
    args = make_args(tmp_path, learning_rate=0.01)
    model = SLCAModel.from_backbone(vit_config, args)
    model.grow(2)
    first = SLCATrainer(model=model, args=args)
    assert group_lrs(first) == pytest.approx({"head": 0.01, "adapter": 0.005, "backbone": 0.001})
    model.grow(2)
    second = SLCATrainer(model=model, args=args)
    assert group_lrs(second) == pytest.approx({"head": 0.01, "adapter": 0.001, "backbone": 0.001})
    # Old heads are frozen: only the newest head is in the head group.
    head_params = next(g for g in second.optimizer.param_groups if g["name"] == "head")["params"]
    assert {id(p) for p in head_params} == {id(p) for p in model.classifier.heads[1].parameters()}
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in second.optimizer.param_groups)


def test_slca_and_seq_ft_rates(tmp_path, vit_config):
    for method, backbone_lr in (("slca", 1e-4), ("seq_ft", 0.01)):
        args = make_args(tmp_path, method=method)
        model = SLCAModel.from_backbone(vit_config, args)
        model.grow(2)
        assert group_lrs(SLCATrainer(model=model, args=args)) == pytest.approx({"head": 0.01, "backbone": backbone_lr})


def test_cosine_schedule_per_epoch_down_to_the_floor(tmp_path, vit_config):
    args = make_args(tmp_path, num_train_epochs=4, learning_rate=0.01)
    model = SLCAModel.from_backbone(vit_config, args)
    model.grow(2)
    trainer = SLCATrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)  # 2 steps per epoch
    floor = 0.01 * 0.1 * 0.1
    seen = []
    for _ in range(8):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [floor + (0.01 - floor) * (1 + math.cos(math.pi * (s // 2) / 4)) / 2 for s in range(8)]
    assert seen == pytest.approx(expected)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(floor)


def test_drop_in_trainer_script_trains_and_evaluates(tmp_path, vit_config):
    args = make_args(tmp_path, num_train_epochs=3, learning_rate=0.05, method="slca++")
    model = SLCAModel.from_backbone(vit_config, args)
    model.grow(2)
    train = toy_dataset([0, 1] * 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SLCATrainer(model=model, args=args, train_dataset=train, eval_dataset=toy_dataset([0, 1] * 4, 1))
    result = trainer.train()
    metrics = trainer.evaluate()
    assert result.training_loss > 0 and np.isfinite(metrics["eval_loss"])
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("heads.0" in n for n in changed)
    assert any("cls_token" in n for n in changed) and any("layernorm" in n for n in changed)


def test_loss_uses_only_the_current_task_logits(tmp_path, vit_config):
    args = make_args(tmp_path, sce_alpha=1.0, sce_beta=0.0)
    model = SLCAModel.from_backbone(vit_config, args)
    model.grow(2)
    model.grow(3)
    trainer = SLCATrainer(model=model, args=args)
    model.train()
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([2, 3, 4, 2])}
    loss = trainer.compute_loss(model, batch)
    logits = model(batch["pixel_values"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 2:], batch["labels"] - 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"task 1 owns classes \[2, 5\)"):
        trainer.compute_loss(model, {"pixel_values": batch["pixel_values"], "labels": torch.tensor([0, 2, 3, 4])})


def test_wrong_model_or_args_type_is_explained(tmp_path, vit_config):
    with pytest.raises(TypeError, match="SLCAModel or a transformers image classifier.*SLCAModel.from_backbone"):
        SLCATrainer(model=torch.nn.Linear(2, 2), args=make_args(tmp_path))
    model = SLCAModel.from_backbone(vit_config)
    model.grow(2)
    with pytest.raises(TypeError, match="SLCAConfig or TrainingArguments"):
        SLCATrainer(model=model, args={"output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="no task head"):
        SLCATrainer(model=SLCAModel.from_backbone(vit_config), args=make_args(tmp_path))


def test_global_batch_size_is_checked_against_the_launch(tmp_path):
    assert make_args(tmp_path, per_device_train_batch_size=32, gradient_accumulation_steps=4,
                     global_batch_size=128).global_batch_size == 128
    with pytest.raises(ValueError, match=r"= 96, not global_batch_size 128.*per_device_train_batch_size to"):
        make_args(tmp_path, per_device_train_batch_size=32, gradient_accumulation_steps=3, global_batch_size=128)


def test_a_plain_training_arguments_is_converted_and_its_optimizer_honoured(tmp_path, vit_config, caplog):
    from transformers import TrainingArguments

    model = SLCAModel.from_backbone(vit_config)
    model.grow(2)
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=0.02, optim="adamw_torch",
                              weight_decay=0.01, report_to="none", save_strategy="no")
    with caplog.at_level("INFO", logger="slca_peft.method.config"):
        trainer = SLCATrainer(model=model, args=plain)
    assert isinstance(trainer.args, SLCAConfig) and trainer.args.learning_rate == 0.02
    assert trainer.args.first_task_lora_lr_scale == 0.5  # the method's fields at their defaults
    assert sum("converted TrainingArguments" in r.message for r in caplog.records) == 1
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"head": 0.02, "adapter": 0.02 * 0.5, "backbone": 0.02 * 0.1})
    # Trainer's exemptions: no decay on biases and LayerNorm weights, decay on the rest.
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    exempt = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert {id(p) for n, p in named.items() if p.requires_grad and (n.endswith("bias") or "layernorm" in n)} == exempt
    assert id(model.classifier.heads[0].weight) in decayed and not decayed & exempt
    # SLCAConfig's default stays the method's SGD, the multi-tensor implementation on CPU.
    sgd = SLCATrainer(model=model, args=make_args(tmp_path)).create_optimizer()
    assert type(sgd) is torch.optim.SGD and sgd.defaults["foreach"] and sgd.defaults["momentum"] == 0.9


@pytest.mark.parametrize(("field", "value", "message"), [
    ("optim", "galore_adamw", "optim='galore_adamw' is not supported.*optim='sgd'"),
    ("label_smoothing_factor", 0.1, "label_smoothing_factor=0.1 is not applied"),
    ("lr_scheduler_kwargs", {"num_cycles": 2}, "lr_scheduler_kwargs=.* is not used by the slca_cosine"),
])
def test_fields_the_trainer_cannot_honour_are_refused_before_training(tmp_path, vit_config, field, value, message):
    model = SLCAModel.from_backbone(vit_config)
    model.grow(2)
    with pytest.raises(ValueError, match=message):
        SLCATrainer(model=model, args=make_args(tmp_path, **{field: value}))


def test_warmup_steps_ramp_linearly_into_the_epoch_cosine(tmp_path, vit_config):
    args = make_args(tmp_path, num_train_epochs=4, learning_rate=0.01, warmup_steps=3)
    model = SLCAModel.from_backbone(vit_config, args)
    model.grow(2)
    trainer = SLCATrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    seen = []
    for _ in range(8):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    floor = 0.01 * 0.1 * 0.1
    cosine = [floor + (0.01 - floor) * (1 + math.cos(math.pi * (s // 2) / 4)) / 2 for s in range(8)]
    assert seen == pytest.approx([0.0, 0.01 / 3, 0.02 / 3, *cosine[3:]])


def test_save_model_writes_a_folder_slca_model_loads(tmp_path, base_model_dir):
    from transformers import TrainingArguments

    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, num_train_epochs=1,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="epoch",
                             optim="sgd", learning_rate=0.05)
    trainer = SLCATrainer(model=model, args=args, train_dataset=toy_dataset([0, 1] * 8))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    for folder in (tmp_path / "saved", next((tmp_path / "run").glob("checkpoint-*"))):
        names = {p.name for p in folder.iterdir()}
        assert "training_args.bin" not in names and not any(n.endswith((".pt", ".pth", ".bin")) for n in names)
        loaded = SLCAModel.from_pretrained(folder).eval()
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    import json

    assert json.loads((tmp_path / "saved" / "training_args.json").read_text())["learning_rate"] == 0.05
    # A checkpoint-N folder also holds the training states, as safetensors + JSON: resuming from it works.
    checkpoint = next((tmp_path / "run").glob("checkpoint-*"))
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "rng_state.json", "rng_state.safetensors",
            "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    trainer.train(resume_from_checkpoint=True)  # the run had finished: nothing left to train
    assert trainer.state.global_step == 2
