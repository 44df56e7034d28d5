"""The offline tiny models, the synthetic images and the bundled demo assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_mllmprobe.demo.synth import CLASSES, make_images, write_image_folder
from pytest_mllmprobe.demo.tiny import FAMILIES, build_tokenizer, save_model, tiny_llava
from pytest_mllmprobe.prompts import build_prompt

DEMO_DIR = Path(__file__).resolve().parents[1] / "pytest_mllmprobe" / "demo"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_llava_round_trips_through_auto_classes(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny_llava(family, extra_words=["zebra"], seed=3)
    save_model(model, processor, tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == family
    assert type(loaded) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name

    images = [image for image, _ in make_images(1, seed=0)[:2]]
    prompt = build_prompt(processor, ["normal", "benign", "zebra"])
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = loaded(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert out.logits.shape[-1] == len(processor.tokenizer)
    assert torch.isfinite(out.logits).all()
    assert (inputs["input_ids"] == loaded.config.image_token_id).any(dim=1).all()


def test_tiny_llava_is_deterministic_for_a_seed() -> None:
    first, _ = tiny_llava("llava", seed=7)
    second, _ = tiny_llava("llava", seed=7)
    other, _ = tiny_llava("llava", seed=8)
    a, b, c = (m.get_input_embeddings().weight for m in (first, second, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tokenizer_knows_the_prompt_and_class_names() -> None:
    tokenizer = build_tokenizer(extra_words=["Zebra"])
    assert tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids("<image>") == tokenizer.image_token_id
    text = "Classify the image. Options: normal, benign, malignant, zebra. Answer with one option."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    for name in (*CLASSES, "cat", "dog", "zebra"):
        assert len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1


def test_make_images_is_deterministic_and_covers_all_classes(tmp_path: Path) -> None:
    first = make_images(3, size=32, seed=5)
    again = make_images(3, size=32, seed=5)
    other = make_images(3, size=32, seed=6)
    assert [name for _, name in first] == [c for c in CLASSES for _ in range(3)]
    assert all(image.mode == "L" and image.size == (32, 32) for image, _ in first)
    pixels = [np.asarray(image) for image, _ in first]
    assert all(np.array_equal(p, np.asarray(q)) for p, (q, _) in zip(pixels, again))
    assert not all(np.array_equal(p, np.asarray(q)) for p, (q, _) in zip(pixels, other))
    # an image does not depend on how many are drawn with it
    assert np.array_equal(pixels[0], np.asarray(make_images(1, seed=5)[0][0]))

    root = write_image_folder(first, tmp_path / "data")
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    assert sorted(p.name for p in (root / "benign").iterdir()) == [f"benign_{i:03d}.png" for i in range(3)]


def test_bundled_demo_assets_exist() -> None:
    for name in CLASSES:
        assert len(list((DEMO_DIR / "data" / name).glob("*.png"))) == 50
    assert (DEMO_DIR / "model" / "config.json").is_file()
    assert (DEMO_DIR / "model" / "model.safetensors").is_file()
    size = sum(p.stat().st_size for p in DEMO_DIR.joinpath("model").rglob("*") if p.is_file())
    assert size < 1_500_000


def test_bundled_demo_model_answers_correctly() -> None:
    from pytest_mllmprobe.demo.build import evaluate

    report = evaluate(DEMO_DIR / "model", DEMO_DIR / "data", probes=False)
    assert report["n"] == 150
    assert report["answer_accuracy"] >= 0.8
    # the options may be listed in any order (sorted folder names, as an ImageFolder gives)
    report = evaluate(DEMO_DIR / "model", DEMO_DIR / "data", class_names=sorted(CLASSES), probes=False)
    assert report["answer_accuracy"] >= 0.8
