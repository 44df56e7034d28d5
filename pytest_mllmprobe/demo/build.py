"""Build the bundled demo: a synthetic evaluation set and a tiny LLaVA trained to classify it.

Run ``python -m pytest_mllmprobe.demo.build`` to (re)write ``demo/data/<class>/*.png`` and
``demo/model/``; ``--check`` only evaluates the assets that are there. Everything is
deterministic: the images come from fixed seeds, and the model is trained on one CPU thread
with deterministic algorithms, so a rebuild gives the same weights on the same software.

The model is trained on its own synthetic training set (a different seed from the bundled
evaluation set) to put the correct class name first at the last prompt position, with the
prompt of :func:`pytest_mllmprobe.prompts.build_prompt`. The options are listed in a random
order during training, so the model answers whatever order a caller lists them in.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..prompts import build_prompt
from .synth import CLASSES, make_images, write_image_folder
from .tiny import save_model, tiny_llava

DEMO_DIR = Path(__file__).resolve().parent

EVAL_SEED = 1234
EVAL_PER_CLASS = 50
TRAIN_SEED = 20240
TRAIN_PER_CLASS = 300
MODEL_SEED = 0
MODEL_SHAPE: dict[str, Any] = dict(
    vision_layers=4, text_layers=4, vision_hidden=32, text_hidden=48, image_size=32, patch_size=8,
    vision_feature_layer=-2,
)
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05


def build(out: str | Path = DEMO_DIR, *, verbose: bool = True) -> dict[str, Any]:
    """Write ``out/data`` and ``out/model``; each is built in a temporary folder and then
    swapped in. Returns a summary (training time, sizes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as scratch:
        scratch = Path(scratch)
        write_image_folder(make_images(EVAL_PER_CLASS, seed=EVAL_SEED), scratch / "data")
        start = time.perf_counter()
        model, processor = train_model(verbose=verbose)
        seconds = time.perf_counter() - start
        save_model(model, processor, scratch / "model")
        for path in (scratch / "model").iterdir():
            path.chmod(0o644)  # some writers create 0600 files; the package must be readable
        for name in ("data", "model"):
            _replace(scratch / name, out / name)
    summary = {
        "train_seconds": round(seconds, 1),
        "data_bytes": _size(out / "data"),
        "model_bytes": _size(out / "model"),
    }
    if verbose:
        print(json.dumps(summary))
    return summary


def train_model(*, verbose: bool = False) -> tuple[Any, Any]:
    """A tiny LLaVA trained on ``TRAIN_PER_CLASS`` synthetic images per class.

    Loss: cross-entropy of the class-name token over the whole vocabulary at the last
    prompt position; all parameters are trained with AdamW and a cosine schedule.
    """
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # fixed reduction order: same weights for the same torch build and CPU
    torch.use_deterministic_algorithms(True)
    try:
        return _train(verbose)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(verbose: bool) -> tuple[Any, Any]:
    """The training loop of :func:`train_model` (threads and determinism already set)."""
    import torch

    torch.manual_seed(MODEL_SEED)
    model, processor = tiny_llava("llava", seed=MODEL_SEED, **MODEL_SHAPE)
    data = make_images(TRAIN_PER_CLASS, seed=TRAIN_SEED)
    pixels = processor.image_processor([image for image, _ in data], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([CLASSES.index(name) for _, name in data])
    orders = list(itertools.permutations(CLASSES))
    prompts = processor(
        images=[data[0][0]] * len(orders),
        text=[build_prompt(processor, list(order)) for order in orders],
        return_tensors="pt",
        padding=True,
    )
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    targets = torch.tensor(class_token_ids(processor, CLASSES))

    generator = torch.Generator().manual_seed(MODEL_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(data) / BATCH_SIZE)
    total = EPOCHS * steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))),
    )
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(data), generator=generator)
        running, correct = 0.0, 0
        for start in range(0, len(data), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            pick = torch.randint(len(orders), (len(batch),), generator=generator)
            flip = torch.rand(len(batch), generator=generator) < 0.5  # mirror: label-preserving
            images = torch.where(flip[:, None, None, None], pixels[batch].flip(-1), pixels[batch])
            logits = model(pixel_values=images, input_ids=ids[pick], attention_mask=mask[pick]).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, targets[labels[batch]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(batch)
            correct += int((logits[:, targets].argmax(-1) == labels[batch]).sum())
        if verbose:
            print(f"epoch {epoch + 1:2d}/{EPOCHS}  loss {running / len(data):.4f}  "
                  f"train acc {correct / len(data):.3f}", flush=True)
    model.eval()
    return model, processor


def class_token_ids(processor: Any, class_names: Sequence[str]) -> list[int]:
    """The single vocabulary id of each class name (the answer token)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = []
    for name in class_names:
        pieces = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise ValueError(f"class name {name!r} is not one token of the vocabulary: {pieces}")
        ids.append(pieces[0])
    return ids


def extract_features(
    model: Any, processor: Any, images: Sequence[Any], class_names: Sequence[str], *, batch_size: int = 50
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features at every locus of a LLaVA model, and the class-name logits at the answer.

    Loci: ``vision.i`` (mean over patch tokens, class token excluded), ``connector`` (mean
    over projected image tokens), ``llm.i.image`` (mean over image-token positions) and
    ``llm.i.last`` (last prompt position) for every decoder layer.
    Returns ``(features, answer_logits)`` with ``answer_logits`` of shape (n, classes).
    """
    import torch

    inner = model.model
    vision_layers = inner.vision_tower.encoder.layers
    llm_layers = inner.language_model.layers
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(keep(f"vision.{i}")) for i, layer in enumerate(vision_layers)]
    handles.append(inner.multi_modal_projector.register_forward_hook(keep("connector")))
    handles += [layer.register_forward_hook(keep(f"llm.{i}")) for i, layer in enumerate(llm_layers)]
    prompt = build_prompt(processor, list(class_names))
    token_ids = class_token_ids(processor, class_names)
    image_token_id = model.config.image_token_id
    parts: dict[str, list[np.ndarray]] = {}
    answers = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = list(images[start : start + batch_size])
                inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
                logits = model(**inputs).logits[:, -1]
                answers.append(logits[:, token_ids].float().numpy())
                is_image = (inputs["input_ids"] == image_token_id).float().unsqueeze(-1)
                for i in range(len(vision_layers)):
                    _add(parts, f"vision.{i}", captured[f"vision.{i}"][:, 1:].mean(1))
                _add(parts, "connector", captured["connector"].mean(1))
                for i in range(len(llm_layers)):
                    hidden = captured[f"llm.{i}"]
                    _add(parts, f"llm.{i}.image", (hidden * is_image).sum(1) / is_image.sum(1))
                    _add(parts, f"llm.{i}.last", hidden[:, -1])
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}, np.concatenate(answers)


def linear_probe(features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on standardised features,
    stratified 50/50 split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.5, stratify=labels, random_state=seed
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def evaluate(
    model_dir: str | Path = DEMO_DIR / "model",
    data_dir: str | Path = DEMO_DIR / "data",
    *,
    class_names: Sequence[str] = CLASSES,
    probes: bool = True,
) -> dict[str, Any]:
    """Load the model with the Auto classes and score it on ``data_dir/<class>/*.png``.

    Returns ``answer_accuracy`` (argmax over the class-name logits at the last prompt
    position, options listed in ``class_names`` order), ``n`` and, with ``probes``, the
    linear-probe accuracy of every locus under ``probe_accuracy``.
    """
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir)).eval()
    images, labels = [], []
    for label, name in enumerate(class_names):
        for path in sorted((Path(data_dir) / name).glob("*.png")):
            with Image.open(path) as image:
                images.append(image.copy())
            labels.append(label)
    y = np.array(labels)
    features, answers = extract_features(model, processor, images, class_names)
    result: dict[str, Any] = {"n": len(y), "answer_accuracy": float((answers.argmax(1) == y).mean())}
    if probes:
        result["probe_accuracy"] = {name: linear_probe(x, y) for name, x in features.items()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the demo assets (default) or ``--check`` the existing ones."""
    parser = argparse.ArgumentParser(prog="python -m pytest_mllmprobe.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR), help="folder that receives data/ and model/ (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only evaluate the assets already in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.check:
        build(out)
    for names in (CLASSES, tuple(sorted(CLASSES))):
        report = evaluate(out / "model", out / "data", class_names=names, probes=names == CLASSES)
        print(f"options {', '.join(names)}: answer accuracy {report['answer_accuracy']:.3f} (n={report['n']})")
        for locus, accuracy in report.get("probe_accuracy", {}).items():
            print(f"  probe {locus:14s} {accuracy:.3f}")
    return 0


def _add(parts: dict[str, list[np.ndarray]], name: str, value: Any) -> None:
    parts.setdefault(name, []).append(value.float().numpy())


def _replace(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing a previous ``target`` folder."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old)
    else:
        source.rename(target)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


if __name__ == "__main__":
    sys.exit(main())
