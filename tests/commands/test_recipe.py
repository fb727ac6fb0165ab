"""recipes/train_seq.py end to end: YAML config, CLI overrides, resume."""

import json
import shutil

import pytest
from conftest import ROOT, recipe_argv

from slca_peft.utils.errors import UserError

#: Two epochs of 2-class tasks without flips, aligned with the default number of epochs.
FLAGS = dict(num_train_epochs=2, learning_rate=0.05, ca_samples_per_class=64, ca_batch_size=32, ca_epochs=None,
             crop_scale_min=0.8, horizontal_flip=False, report_to=None)


def test_yaml_config_is_overridden_by_the_command_line(recipe, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_config: m.json\ndataset: digits\nmethod: slca\nlearning_rate: 0.1\n"
                      "lora_target_modules: [q_proj, v_proj]\noutput_dir: out\n")
    model_args, data_args, args = recipe.parse_args(["--config", str(config), "--learning_rate", "0.02"])
    assert (args.method, args.learning_rate, args.backbone_lr_scale) == ("slca", 0.02, 0.01)
    assert args.lora_target_modules == ["q_proj", "v_proj"] and data_args.dataset == "digits"
    assert model_args.model_config == "m.json"
    with pytest.raises(UserError, match="--dataset NAME, both --train_dir and --test_dir"):
        recipe.parse_args(["--model_config", "m.json", "--output_dir", "o"])


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_metrics(recipe, tmp_path, base_model_dir, image_folders, capsys):
    full = tmp_path / "full"
    recipe.main(recipe_argv(base_model_dir, image_folders, full, **FLAGS))
    out = capsys.readouterr().out
    assert "Last-Acc" in out and "task 3/3" in out
    metrics = json.loads((full / "metrics.json").read_text())
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert sorted(p.name for p in full.glob("task_*")) == ["task_0", "task_1", "task_2"]
    state = json.loads((full / "task_2" / "continual_state.json").read_text())
    assert state["seed"] == recipe.SLCAConfig(output_dir="x").class_order_seed  # the class order is recorded

    # An interrupted run: only the first two tasks finished.
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    shutil.rmtree(partial / "task_2")
    (partial / "metrics.json").unlink()
    recipe.main(recipe_argv(base_model_dir, image_folders, partial, **FLAGS) + ["--resume_from", "auto"])
    resumed = json.loads((partial / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == metrics["accuracy_matrix"]
    assert resumed["last_accuracy"] == metrics["last_accuracy"]


@pytest.mark.slow
def test_resume_with_another_class_order_is_refused_and_writes_nothing(recipe, tmp_path, base_model_dir, image_folders):
    out = tmp_path / "run"
    args = recipe_argv(base_model_dir, image_folders, out, **FLAGS)
    args[args.index("--num_train_epochs") + 1] = "1"
    args += ["--init_cls", "4"]  # two tasks: 4 + 2
    recipe.main(args)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(ValueError, match="class_order"):
        recipe.main(args + ["--class_order_seed", "7", "--resume_from", str(out / "task_0")])
    with pytest.raises(ValueError, match="task_sizes"):
        recipe.main(args + ["--increment", "1", "--resume_from", str(out / "task_0")])
    # The run directory's fingerprint lists every setting that differs ...
    with pytest.raises(ValueError, match=r'lora_layout \("per_projection" -> "fused_qkv"\).*reset_final_norm'):
        recipe.main(args + ["--released_code", "true", "--resume_from", str(out / "task_0")])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    # ... and the Python API, which has no run directory to compare with, checks the model's own setting.
    from slca_peft import ContinualLearner, SLCAConfig, TaskSequence

    tasks = TaskSequence.from_image_folders(*image_folders, init_cls=4, increment=2, seed=1993)
    released = SLCAConfig(output_dir=str(tmp_path / "api"), use_cpu=True, released_code=True, report_to="none")
    with pytest.raises(ValueError, match="lora_layout='per_projection', this run asks for 'fused_qkv'"):
        ContinualLearner.from_checkpoint(out / "task_0", released, tasks)


@pytest.mark.parametrize("method", ["slca++", "slca", "sl", "seq_ft"])
def test_cifar100_configs_match_the_paper(recipe, method):
    config = ROOT / f"recipes/configs/cifar100_in21k_{method}.yaml"
    model_args, data_args, args = recipe.parse_args(["--config", str(config)])
    assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k" and data_args.dataset == "cifar100"
    assert (args.init_cls, args.increment, args.class_order_seed, args.num_train_epochs) == (10, 10, 1993, 20)
    assert (args.learning_rate, args.weight_decay, args.per_device_train_batch_size) == (0.01, 5e-4, 128)
    assert (args.sce_alpha, args.sce_beta, args.ca_temperature, args.ca_epochs) == (1.0, 0.1, 0.1, 5)
    assert data_args.brightness_jitter == pytest.approx(63 / 255)
    assert args.backbone_lr_scale == {"slca++": 0.1, "sl": 0.1, "slca": 0.01, "seq_ft": 1.0}[method]
    assert args.align == (method in ("slca++", "slca"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--eval_strategy", "epoch"], "--eval_strategy epoch: the loop evaluates every seen task"),
    (["--save_strategy", "steps"], "--save_strategy steps: the loop writes a checkpoint after each task"),
    (["--load_best_model_at_end", "true", "--eval_strategy", "no"], "--load_best_model_at_end"),
    (["--resume_from_checkpoint", "runs/x/task_2"], "use --resume_from runs/x/task_2"),
])
def test_trainer_flags_the_loop_cannot_honour_are_refused_naming_the_replacement(recipe, flags, message):
    with pytest.raises(UserError, match=message):
        recipe.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", "o", *flags])


def test_two_flags_at_once_are_all_named_and_other_rules_refuse_with_their_line(recipe, tmp_path):
    with pytest.raises(UserError, match="--eval_strategy steps: .*; --save_strategy steps: .*drop the flag.$"):
        recipe.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", "o",
                           "--eval_strategy", "steps", "--save_strategy", "steps"])
    for flags, message in [
        (["--dataset", "digits"], "give --model_name_or_path (pre-trained backbone) or --model_config"),
        (["--model_config", "m.json", "--dataset", "digits", "--seeds", "1", "2", "--resume_from", "runs/task_0"],
         "with --seeds, --resume_from can only be `auto`"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            recipe.parse_args([*flags, "--output_dir", str(tmp_path / "o")])
    from slca_peft.commands.arguments import ARGUMENT_RULES, TRAINER_FLAG_RULES

    for _, line in ARGUMENT_RULES + TRAINER_FLAG_RULES:
        assert "--" in line and "\n" not in line  # each names its flag, on one line


def test_the_dataset_hub_id_reaches_the_task_history(recipe):
    """The model card lists `datasets` from the task history: the recipe records the Hub id."""
    assert recipe.dataset_hub_id("CIFAR-100") == "uoft-cs/cifar100"
    assert recipe.dataset_hub_id("me/my-images") == "me/my-images"
    assert recipe.dataset_hub_id("digits") is None and recipe.dataset_hub_id(None) is None
