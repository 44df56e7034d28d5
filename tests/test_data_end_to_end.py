"""Every data format runs end to end through the engine, and both P_final modes are reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe import run
from pytest_mllmprobe.answer import parse_answer
from pytest_mllmprobe.demo.synth import CLASSES, make_images, write_image_folder

N_PER_CLASS = 16


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    images = make_images(N_PER_CLASS, seed=11)
    root = tmp_path_factory.mktemp("formats")
    write_image_folder(images, root / "folder")
    return root, images


def _probe(spec: str) -> dict[str, float]:
    result = run("demo", data=spec, test_size=0.5)["demo"]
    return {name: locus.accuracy for name, locus in result.loci.items()}


@pytest.fixture(scope="module")
def from_folder(lesions) -> dict[str, float]:
    root, _ = lesions
    return _probe(str(root / "folder"))


def _rows(root: Path) -> list[dict[str, str]]:
    return [
        {"path": f"folder/{p.parent.name}/{p.name}", "label": p.parent.name}
        for p in sorted((root / "folder").rglob("*.png"))
    ]


def test_the_image_folder_runs_end_to_end(from_folder) -> None:
    assert from_folder["answer"] >= 0.8
    assert from_folder["vision.0"] > 1 / 3


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifests_give_the_same_numbers_as_the_folder(lesions, from_folder, kind: str) -> None:
    root, _ = lesions
    rows = _rows(root)
    path = root / f"labels.{kind}"
    if kind == "csv":
        path.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _probe(str(path)) == from_folder


def test_a_python_entry_gives_the_same_numbers_as_the_folder(lesions, from_folder, monkeypatch) -> None:
    root, images = lesions
    (root / "lesion_entry.py").write_text(
        "from pytest_mllmprobe.demo.synth import make_images\n"
        # in the folder's order (class by class), so that the folds hold the same images
        f"def load():\n    pairs = sorted(make_images({N_PER_CLASS}, seed=11), key=lambda pair: pair[1])\n"
        "    return [im for im, _ in pairs], [name for _, name in pairs]\n"
    )
    monkeypatch.syspath_prepend(str(root))
    assert _probe("lesion_entry:load") == from_folder


def test_an_npz_with_a_predefined_split_runs_end_to_end(lesions) -> None:
    root, images = lesions
    arrays = np.stack([np.asarray(image) for image, _ in images])
    labels = np.array([CLASSES.index(name) for _, name in images])
    test = np.arange(len(labels)) % 2 == 1
    np.savez(root / "lesions.npz", train_images=arrays[~test], train_labels=labels[~test],
             test_images=arrays[test], test_labels=labels[test])
    (root / "lesions.yaml").write_text("class_names: [normal, benign, malignant]\n")
    result = run("demo", data=str(root / "lesions.npz"))["demo"]
    assert result.n_test == int(test.sum())
    assert result.loci["answer"].accuracy >= 0.8


def test_dicom_runs_end_to_end(lesions, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    _, images = lesions
    for index, (image, name) in enumerate(images):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        target = tmp_path / name / f"{index:03d}.dcm"
        target.parent.mkdir(exist_ok=True)
        ds = FileDataset(str(target), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        pixels = (np.asarray(image).astype(np.uint16) * 16)  # 12-bit range
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(target, enforce_file_format=True)
    result = run("demo", data=str(tmp_path), test_size=0.5)["demo"]
    assert result.loci["answer"].accuracy >= 0.8


def test_k_fold_tests_every_image_once_and_reports_the_spread(lesions) -> None:
    root, _ = lesions
    result = run("demo", data=str(root / "folder"), folds=4)["demo"]
    assert result.n_test == 3 * N_PER_CLASS
    for locus in result.loci.values():
        if locus.name != "answer":
            assert locus.fold_accuracy is not None and len(locus.fold_accuracy) == 4
            assert min(locus.fold_accuracy) <= locus.accuracy <= max(locus.fold_accuracy)
            figures = locus.to_dict()
            assert figures["fold_mean"] == pytest.approx(sum(locus.fold_accuracy) / 4)
            assert figures["fold_std"] >= 0.0


@pytest.mark.parametrize(("text", "expected"), [
    ("Malignant.", 2), ("it looks benign, not malignant", 1), ("NORMAL tissue", 0),
    ("no idea", -1), ("benignity", -1), ("", -1),
])
def test_answers_are_parsed_by_the_first_whole_class_name(text: str, expected: int) -> None:
    assert parse_answer(text, list(CLASSES)) == expected


def test_generation_reports_both_p_final_and_the_parse_failure_rate(lesions) -> None:
    root, _ = lesions
    result = run("demo", data=str(root / "folder"), test_size=0.5, answer="generate")["demo"]
    answers = result.answers
    assert answers["mode"] == "generate"
    assert answers["generate"]["parse_failure_rate"] == 0.0
    assert answers["generate"]["accuracy"] == result.loci["answer"].accuracy >= 0.8
    assert answers["likelihood"]["accuracy"] >= 0.8


def test_a_model_that_never_says_a_class_name_fails_by_parse_failures(lesions, tmp_path: Path) -> None:
    """Planted fault: the checkpoint's generation config bans the class-name tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pytest_mllmprobe.demo import DEMO_MODEL

    root, _ = lesions
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL)
    processor = AutoProcessor.from_pretrained(DEMO_MODEL)
    model.generation_config.bad_words_ids = [[processor.tokenizer.convert_tokens_to_ids(c)] for c in CLASSES]
    target = tmp_path / "mute"
    model.save_pretrained(target)
    processor.save_pretrained(target)
    result = run(str(target), data=str(root / "folder"), test_size=0.5, answer="generate")["mute"]
    assert result.answers["generate"]["parse_failure_rate"] == 1.0
    assert result.loci["answer"].accuracy == 0.0
    assert result.answers["likelihood"]["accuracy"] >= 0.8  # the knowledge is there, unsaid
    assert result.first_failing_stage == "answer"
