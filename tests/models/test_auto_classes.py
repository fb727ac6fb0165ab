"""transformers' Auto classes and `pipeline()` on an slca-peft model folder give the trained model, never the
adapter's base with a random head (what transformers 5 builds from `adapter_config.json` alone)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import trained_model
from PIL import Image
from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessor, pipeline

from slca_peft import SLCAModel


@pytest.fixture
def model_folder(base_model_dir, tmp_path):
    model = trained_model(base_model_dir)
    model.label_names = ["cat", "dog", "emu", "fox", "gnu"]
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder)
    return model, folder


def test_the_auto_class_loads_the_trained_model_of_a_model_folder(model_folder):
    model, folder = model_folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "slca_peft"
    assert type(AutoConfig.from_pretrained(folder)).model_type == "slca_peft"
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    assert isinstance(loaded, SLCAModel) and not loaded.training
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "emu", 3: "fox", 4: "gnu"}
    # The Auto classes' loading keywords pass through (dtype), and refused ones still say why.
    assert AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device_map is not supported"):
        AutoModelForImageClassification.from_pretrained(folder, device_map="cpu")
    # A refused keyword at the value that asks for the default behaviour (what transformers' example scripts
    # always pass) loads; a value slca-peft cannot honour is refused, naming the keyword.
    defaults = {"from_tf": False, "from_flax": False, "use_safetensors": True, "trust_remote_code": False,
                "ignore_mismatched_sizes": False, "device_map": None, "revision": "main", "cache_dir": None}
    assert isinstance(AutoModelForImageClassification.from_pretrained(folder, **defaults), SLCAModel)
    assert isinstance(SLCAModel.from_pretrained(folder, **defaults), SLCAModel)
    for name, value in (("from_tf", True), ("use_safetensors", False), ("trust_remote_code", True),
                        ("ignore_mismatched_sizes", True)):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            SLCAModel.from_pretrained(folder, **{name: value})


def test_pipeline_on_a_model_folder_answers_as_the_model(model_folder):
    model, folder = model_folder
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    classify = pipeline("image-classification", model=str(folder))
    answers = [top[0]["label"] for top in classify(images, top_k=1)]
    processor = ViTImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).logits
    assert answers == [model.config.id2label[int(k)] for k in logits.argmax(-1)]


@pytest.mark.slow
def test_without_slca_peft_imported_transformers_refuses_the_folder(model_folder):
    _, folder = model_folder
    code = ("from transformers import AutoModelForImageClassification as A\n"
            f"A.from_pretrained({str(folder)!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "model type `slca_peft`" in run.stderr
