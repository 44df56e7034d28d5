"""Data sources, image modes, splits and bad inputs, on real handwritten digits (scikit-learn).

The digits (8x8, 0..16) are written out as every supported format; each must load to the same
labels and pixels. No torch here: the data package must stay importable without it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytest_mllmprobe.data import (
    DICOM_EXTRA,
    Dataset,
    DataWarning,
    fold_indices,
    load_dataset,
    load_image,
    load_image_folder,
    split_indices,
    to_rgb,
)
from pytest_mllmprobe.data.images import SKIP_HINT
from pytest_mllmprobe.data.splits import LEAK_WARNING
from pytest_mllmprobe.errors import ConfigError

NAMES = ["nil", "one", "two"]
PER_CLASS = 12
PATIENTS_PER_CLASS = 4  # 3 images each


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """36 real digits (classes 0, 1, 2; 12 each, class-major), as uint8 0..240."""
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=3)
    picks = np.concatenate([np.flatnonzero(bunch.target == c)[:PER_CLASS] for c in range(3)])
    return (bunch.images[picks] * 15).astype(np.uint8), bunch.target[picks].astype(np.int64)


def _patient(i: int) -> str:
    return f"p{i // 3:02d}"  # three consecutive images per patient, one class per patient


@pytest.fixture(scope="module")
def folder(digits, tmp_path_factory) -> Path:
    images, labels = digits
    root = tmp_path_factory.mktemp("digits") / "folder"
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / NAMES[label] / f"{i:03d}.png")
    return root


def _relpaths(digits) -> list[str]:
    return [f"folder/{NAMES[label]}/{i:03d}.png" for i, label in enumerate(digits[1])]


@pytest.fixture(scope="module")
def csv_manifest(folder, digits) -> Path:
    path = folder.parent / "labels.csv"
    lines = ["path,label,group"] + [
        f"{rel},{NAMES[label]},{_patient(i)}" for i, (rel, label) in enumerate(zip(_relpaths(digits), digits[1]))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def jsonl_manifest(folder, digits) -> Path:
    path = folder.parent / "labels.jsonl"
    rows = [
        {"path": rel, "label": NAMES[label], "group": _patient(i)}
        for i, (rel, label) in enumerate(zip(_relpaths(digits), digits[1]))
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def npz(digits, tmp_path_factory) -> Path:
    images, labels = digits
    test = np.zeros(len(labels), dtype=bool)
    test[[i for c in range(3) for i in np.flatnonzero(labels == c)[-4:]]] = True
    root = tmp_path_factory.mktemp("npz")
    path = root / "digitsmnist.npz"
    np.savez(path, train_images=images[~test][:-3], train_labels=labels[~test][:-3, None],
             val_images=images[~test][-3:], val_labels=labels[~test][-3:, None],
             test_images=images[test], test_labels=labels[test, None])
    (root / "digitsmnist.yaml").write_text("label: {'0': nil, '1': one, '2': two}\n")
    return path


ENTRY = '''
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

def load():
    bunch = load_digits(n_class=3)
    picks = np.concatenate([np.flatnonzero(bunch.target == c)[:12] for c in range(3)])
    images = [(bunch.images[i] * 15).astype(np.uint8) for i in picks]
    images[0] = Image.fromarray(images[0], mode="L")     # PIL images and arrays mix
    images[1] = {first_path!r}                            # and so do paths
    return images, [int(t) for t in bunch.target[picks]], ["nil", "one", "two"]

def strings():
    images, labels, names = load()
    return images, [names[k] for k in labels]

def out_of_range():
    images, labels, names = load()
    return images, labels, names[:2]

def short():
    images, labels, names = load()
    return images[:-1], labels
'''


@pytest.fixture
def entry(folder, tmp_path, monkeypatch) -> str:
    (tmp_path / "mllm_digits_entry.py").write_text(ENTRY.format(first_path=str(folder / "nil" / "001.png")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mllm_digits_entry", raising=False)
    return "mllm_digits_entry"


def write_dicom(path: Path, pixels: np.ndarray, **attrs) -> Path:
    """A minimal greyscale DICOM file written with pydicom's own API."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)  # pydicom 2.x
    return path


def _content(dataset: Dataset) -> list[tuple[str, bytes]]:
    """Order-free content: (class name, RGB bytes) per sample, sorted."""
    return sorted((dataset.class_names[dataset.labels[i]], dataset.image(i).tobytes()) for i in range(len(dataset)))


def _expected(digits) -> list[tuple[str, bytes]]:
    images, labels = digits
    return sorted((NAMES[label], to_rgb(image).tobytes()) for image, label in zip(images, labels))


# --- every format round-trips ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "csv", "jsonl", "npz", "entry", "dicom"])
def test_every_format_loads_the_same_labels_and_pixels(kind, digits, request, tmp_path) -> None:
    if kind == "dicom":
        for i, (image, label) in enumerate(zip(*digits)):
            name = f"{i:03d}" + (".dcm" if i % 2 else "")  # suffix-less files are found by their DICM marker
            write_dicom(tmp_path / "dicom" / NAMES[label] / name, image, WindowCenter=128, WindowWidth=256)
        spec = str(tmp_path / "dicom")
    else:
        spec = {"folder": "folder", "csv": "csv_manifest", "jsonl": "jsonl_manifest", "npz": "npz"}.get(kind)
        spec = f"{request.getfixturevalue('entry')}:load" if kind == "entry" else str(request.getfixturevalue(spec))
    dataset = load_dataset(spec)
    assert dataset.class_names == tuple(NAMES)
    assert dataset.display_names == tuple(NAMES)
    assert np.bincount(dataset.labels).tolist() == [PER_CLASS] * 3
    assert _content(dataset) == _expected(digits)
    assert len(set(dataset.ids)) == len(dataset)
    assert dataset.fingerprint == load_dataset(spec).fingerprint


def test_ids_are_stable_and_say_where_a_sample_came_from(folder, csv_manifest, npz, entry) -> None:
    assert load_dataset(folder).ids[0] == "nil/000.png"
    assert load_dataset(csv_manifest).ids[0] == "folder/nil/000.png"
    assert load_dataset(npz).ids[-1] == "npz:test:11"
    assert "npz:val:2" in load_dataset(npz).ids
    assert load_dataset(f"{entry}:load").ids[:2] == ("entry:0", "entry:1")
    assert load_image_folder(folder).ids == load_dataset(folder).ids


def test_groups_and_predefined_splits_come_from_the_sources(csv_manifest, jsonl_manifest, npz, entry) -> None:
    assert load_dataset(jsonl_manifest).groups.tolist() == [_patient(i) for i in range(36)]
    assert load_dataset(csv_manifest).predefined_split is None
    data = load_dataset(npz)
    assert data.predefined_split.sum() == 12 and data.groups is None
    assert all(i.startswith("npz:test:") for i in np.asarray(data.ids)[data.predefined_split])
    assert load_dataset(f"{entry}:strings").class_names == tuple(NAMES)  # string labels, sorted


def test_the_fingerprint_changes_with_labels_and_content(folder, tmp_path, digits) -> None:
    base = load_dataset(folder)
    manifest = tmp_path / "m.csv"
    rows = [f"{p},{base.class_names[base.labels[i]]}" for i, p in enumerate(base.paths)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    first = load_dataset(manifest).fingerprint
    swapped = rows[:]
    swapped[0] = f"{base.paths[0]},two"
    manifest.write_text("path,label\n" + "\n".join(swapped) + "\n")
    assert load_dataset(manifest).fingerprint != first


# --- dataset YAML ----------------------------------------------------------------------------

def test_a_dataset_yaml_orders_subsets_renames_and_sets_the_prompt(csv_manifest) -> None:
    spec = csv_manifest.parent / "digits.yaml"
    spec.write_text(
        "source: labels.csv\nclass_names: [two, nil]\ndisplay_names: {two: 'the digit 2'}\n"
        "prompt: 'Which digit? Options: {options}.'\ngroup_column: group\n"
    )
    data = load_dataset(spec)
    assert data.class_names == ("two", "nil")
    assert data.display_names == ("the digit 2", "nil")
    assert data.prompt == "Which digit? Options: {options}."
    assert np.bincount(data.labels).tolist() == [PER_CLASS, PER_CLASS]
    assert all(p.startswith(("folder/two/", "folder/nil/")) for p in data.ids)


def test_a_dataset_yaml_names_the_labels_of_an_npz(npz, tmp_path) -> None:
    bare = tmp_path / "bare.npz"
    with np.load(npz) as archive:
        np.savez(bare, **{k: archive[k] for k in archive.files})
    assert load_dataset(bare).class_names == ("0", "1", "2")
    spec = tmp_path / "named.yaml"
    spec.write_text("source: bare.npz\nclass_names: [nil, one, two]\n")
    assert load_dataset(spec).class_names == tuple(NAMES)
    spec.write_text("source: bare.npz\nclass_names: {2: two, 0: nil}\n")
    data = load_dataset(spec)
    assert data.class_names == ("two", "nil") and len(data) == 2 * PER_CLASS


def test_a_misspelt_yaml_key_names_the_close_match(csv_manifest) -> None:
    spec = csv_manifest.parent / "typo.yaml"
    spec.write_text("source: labels.csv\nclass_name: [nil, one]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'class_name' \(did you mean 'class_names'"):
        load_dataset(spec)
    spec.write_text("source: labels.csv\nclass_names: [nil, onee]\n")
    with pytest.raises(ConfigError, match=r"'onee' is not a label in the data \(did you mean 'one'\?\)"):
        load_dataset(spec)
    spec.write_text("source: labels.csv\nprompt: 'Which digit?'\n")
    with pytest.raises(ConfigError, match=r"no '\{options\}' placeholder"):
        load_dataset(spec)
    spec.write_text("source: labels.csv\ndisplay_names: {nil: digit, one: digit}\n")
    with pytest.raises(ConfigError, match="share the display name 'digit'"):
        load_dataset(spec)
    spec.write_text("source: labels.npz\n")
    with pytest.raises(ConfigError, match=r"source 'labels.npz' does not exist \(did you mean .*'labels.csv'"):
        load_dataset(spec)


# --- image modes -----------------------------------------------------------------------------

def test_a_16_bit_png_is_min_max_scaled_neither_clipped_nor_wrapped(tmp_path) -> None:
    values = np.tile(np.linspace(1000, 60000, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really stored as 16 bits
    grey = np.asarray(load_image(path))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert (np.diff(grey[0].astype(int)) >= 0).all()  # monotone: nothing wrapped past 255
    assert len(np.unique(grey)) == 256  # nothing saturated: every level used once
    expected = np.rint((values - 1000) / 59000 * 255).astype(np.uint8)
    assert np.array_equal(grey, expected)
    assert np.array_equal(np.asarray(to_rgb(values))[..., 0], expected)  # same rule for arrays


def test_float_images_in_0_1_are_scaled_by_255_and_others_min_max(tmp_path) -> None:
    unit = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "unit.tif"))[..., 0], np.rint(unit * 255).astype(np.uint8))
    wide = unit * 10 - 5
    wide[0, 0] = np.nan
    grey = np.asarray(to_rgb(wide))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and grey[0, 0] == 0


def test_dicom_applies_rescale_then_the_window_and_inverts_monochrome1(tmp_path) -> None:
    pytest.importorskip("pydicom")
    from pytest_mllmprobe.data.dicom import window

    raw = np.tile(np.linspace(0, 1000, 101).round().astype(np.uint16), (3, 1))
    hu = raw * 2.0 - 1000.0
    expected = np.clip(np.rint(window(hu, 0.0, 1000.0)), 0, 255).astype(np.uint8)
    write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope="2", RescaleIntercept="-1000",
                WindowCenter="0", WindowWidth="1000")
    grey = np.asarray(load_image(tmp_path / "ct.dcm"))[..., 0]
    assert np.array_equal(grey, expected)
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and grey[0, 50] in (127, 128)
    assert grey[0, 20] == 0 and grey[0, 80] == 255  # outside the window: black / white
    write_dicom(tmp_path / "inv.dcm", raw, RescaleSlope="2", RescaleIntercept="-1000",
                WindowCenter="0", WindowWidth="1000", PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(np.asarray(load_image(tmp_path / "inv.dcm"))[..., 0], 255 - expected)
    wide = np.tile(np.linspace(1000, 60000, 256).round().astype(np.uint16), (2, 1))
    write_dicom(tmp_path / "plain.dcm", wide)  # no window: min-max, like a 16-bit PNG
    grey = np.asarray(load_image(tmp_path / "plain.dcm"))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) == 256


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "scans" / "a" / "x.dcm"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "scans" / "b").mkdir()
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(ConfigError, match="x.dcm") as error:
        load_dataset(tmp_path / "scans")
    assert DICOM_EXTRA in str(error.value)


# --- splits ----------------------------------------------------------------------------------

def test_split_indices_keeps_the_old_call_and_is_stratified(digits) -> None:
    labels = digits[1]
    train, test = split_indices(labels, 0.25, 3)
    assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test]).tolist() == [3, 3, 3]
    assert np.array_equal(split_indices(labels, 0.25, 3)[1], test)


def test_a_predefined_split_is_honoured(npz, csv_manifest, tmp_path) -> None:
    data = load_dataset(npz)
    train, test = split_indices(data, 0.5, 123)
    assert np.array_equal(test, np.flatnonzero(data.predefined_split))
    manifest = tmp_path / "split.csv"
    lines = csv_manifest.read_text().replace("folder/", str(csv_manifest.parent / "folder") + "/").splitlines()
    body = [f"{line},{'test' if (i // 3) % 4 == 0 else 'Train'}" for i, line in enumerate(lines[1:])]
    manifest.write_text("\n".join([lines[0] + ",split", *body]))
    data = load_dataset(manifest)
    assert split_indices(data, 0.3, 0)[1].tolist() == [0, 1, 2, 12, 13, 14, 24, 25, 26]


def test_a_grouped_split_never_puts_a_patient_on_both_sides(jsonl_manifest) -> None:
    data = load_dataset(jsonl_manifest)
    tests = set()
    for seed in range(60):
        train, test = split_indices(data, 0.3, seed)
        assert not set(data.groups[train]) & set(data.groups[test])
        assert set(data.labels[train]) == set(data.labels[test]) == {0, 1, 2}
        assert 6 <= len(test) <= 15  # whole patients of 3 images: near 30 % of 36
        tests.add(tuple(test))
    assert len(tests) > 20  # the seed matters


def test_k_folds_partition_the_data_and_respect_groups(folder, jsonl_manifest, npz) -> None:
    plain = load_dataset(folder)
    folds = fold_indices(plain, 4, seed=0)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(len(plain)))
    assert all(np.bincount(plain.labels[t]).tolist() == [3, 3, 3] for _, t in folds)
    grouped = load_dataset(jsonl_manifest)
    for seed in range(10):
        for train, test in fold_indices(grouped, 3, seed):
            assert not set(grouped.groups[train]) & set(grouped.groups[test])
    with pytest.raises(ConfigError, match="predefined train/test split"):
        fold_indices(load_dataset(npz), 3, 0)
    with pytest.raises(ConfigError, match="at least 13 per class"):
        fold_indices(plain, 13, 0)


def test_duplicate_images_across_the_split_are_warned_about(folder, tmp_path) -> None:
    rows = ["path,label"] + [f"{folder / 'nil' / '000.png'}".replace("000", f"{i:03d}") + ",nil" for i in range(4)]
    for i in range(6):
        copy = tmp_path / f"copy{i}.png"
        copy.write_bytes((folder / "one" / "012.png").read_bytes())
        rows.append(f"{copy},one")
    (tmp_path / "dupes.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(DataWarning, match=re.escape(LEAK_WARNING)):
        split_indices(load_dataset(tmp_path / "dupes.csv"), 0.5, 0)


def test_a_patient_on_both_sides_of_a_predefined_split_is_warned_about(csv_manifest, tmp_path) -> None:
    lines = csv_manifest.read_text().replace("folder/", str(csv_manifest.parent / "folder") + "/").splitlines()
    body = [f"{line},{'test' if i % 3 == 0 else 'train'}" for i, line in enumerate(lines[1:])]
    (tmp_path / "m.csv").write_text("\n".join([lines[0] + ",split"] + body))
    with pytest.warns(DataWarning, match="both sides of the predefined split"):
        split_indices(load_dataset(tmp_path / "m.csv"), 0.3, 0)


def test_max_samples_keeps_groups_and_ids_aligned(jsonl_manifest) -> None:
    full = load_dataset(jsonl_manifest)
    small = load_dataset(jsonl_manifest, max_samples=18, seed=1)
    assert 15 <= len(small) <= 21
    where = {sample_id: i for i, sample_id in enumerate(full.ids)}
    for i, sample_id in enumerate(small.ids):
        assert small.groups[i] == full.groups[where[sample_id]]
        assert small.labels[i] == full.labels[where[sample_id]]


# --- bad inputs ------------------------------------------------------------------------------

def _copy_folder(folder: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, target))


def test_a_corrupt_image_fails_or_is_skipped_and_recorded(folder, tmp_path) -> None:
    root = _copy_folder(folder, tmp_path / "data")
    (root / "one" / "bad.png").write_bytes(b"not a png at all")
    good = (root / "two" / "024.png").read_bytes()
    (root / "two" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ConfigError, match="one/bad.png") as error:
        load_dataset(root)
    assert SKIP_HINT in str(error.value)
    data = load_dataset(root, skip_bad_images=True)
    assert [sample_id for sample_id, _ in data.skipped] == ["one/bad.png", "two/cut.png"]
    assert len(data) == 36


def test_a_manifest_row_with_a_missing_file_names_its_line(csv_manifest, jsonl_manifest, tmp_path) -> None:
    lines = csv_manifest.read_text().splitlines()
    lines[3] = lines[3].replace("002.png", "missing.png")
    bad = csv_manifest.parent / "missing.csv"
    bad.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=r"missing.csv' line 4: file 'folder/nil/missing.png' does not exist"):
        load_dataset(bad)
    rows = [json.loads(line) for line in jsonl_manifest.read_text().splitlines()]
    rows[1]["path"] = "nowhere.png"
    (csv_manifest.parent / "missing.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(ConfigError, match="line 2: file 'nowhere.png' does not exist"):
        load_dataset(csv_manifest.parent / "missing.jsonl")


def test_manifest_columns_are_checked(csv_manifest) -> None:
    text = csv_manifest.read_text()
    bad = csv_manifest.parent / "cols.csv"
    bad.write_text(text.replace("path,label,group", "path,label,patient"))
    with pytest.raises(ConfigError, match="unknown column 'patient'.*ignore_columns"):
        load_dataset(bad)
    bad.write_text(text.replace("path,label,group", "paths,label,group"))
    with pytest.raises(ConfigError, match=r"no 'path' column \(did you mean 'paths'\?\)"):
        load_dataset(bad)
    bad.write_text("path,label\n")
    with pytest.raises(ConfigError, match="lists no images"):
        load_dataset(bad)
    spec = csv_manifest.parent / "cols.yaml"
    bad.write_text(text.replace("path,label,group", "path,label,patient"))
    spec.write_text("source: cols.csv\ngroup_column: patient\n")
    assert load_dataset(spec).groups[0] == "p00"


def test_a_label_outside_the_class_names_is_refused(entry, csv_manifest) -> None:
    with pytest.raises(ConfigError, match=r"entry:24: label 2 is outside class_names"):
        load_dataset(f"{entry}:out_of_range")
    with pytest.raises(ConfigError, match="returned 35 images but 36 labels"):
        load_dataset(f"{entry}:short")
    with pytest.raises(ConfigError, match=r"has no function 'lod' \(did you mean 'load'\?\)"):
        load_dataset(f"{entry}:lod")
    lines = csv_manifest.read_text().splitlines()
    lines[5] = lines[5].replace(",nil,", ",nill,")
    (csv_manifest.parent / "typo.csv").write_text("\n".join(lines))
    (csv_manifest.parent / "typo.yaml").write_text("source: typo.csv\nclass_names: [nil, one]\n")
    with pytest.raises(ConfigError, match=r"typo.csv' line 6: label 'nill' is not in class_names \(did you mean 'nil'"):
        load_dataset(csv_manifest.parent / "typo.yaml")


def test_leaving_out_a_similarly_named_class_is_not_a_typo(csv_manifest) -> None:
    text = csv_manifest.read_text()
    for k, name in enumerate(NAMES):
        text = text.replace(f",{name},", f",grade{k},")
    (csv_manifest.parent / "grades.csv").write_text(text)
    (csv_manifest.parent / "grades.yaml").write_text("source: grades.csv\nclass_names: [grade2, grade0]\n")
    data = load_dataset(csv_manifest.parent / "grades.yaml")
    assert data.class_names == ("grade2", "grade0") and len(data) == 2 * PER_CLASS


def test_too_few_images_one_class_and_no_images_are_refused(folder, tmp_path) -> None:
    root = tmp_path / "few"
    for name, count in (("nil", 5), ("one", 1)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes((folder / "nil" / f"{i:03d}.png").read_bytes())
    with pytest.raises(ConfigError, match=r"class\(es\) \['one'\] have fewer than 2 images"):
        split_indices(load_dataset(root), 0.3, 0)
    (root / "one" / "0.png").unlink()
    with pytest.raises(ConfigError, match="only one class with images"):
        load_dataset(root)
    for file in (root / "nil").iterdir():
        file.unlink()
    with pytest.raises(ConfigError, match="holds no images"):
        load_dataset(root)


def test_a_grouped_class_from_one_patient_is_refused(jsonl_manifest, tmp_path) -> None:
    rows = [json.loads(line) for line in jsonl_manifest.read_text().splitlines()]
    for row in rows:
        row["path"] = str(jsonl_manifest.parent / row["path"])
        if row["label"] == "two":
            row["group"] = "same"
    (tmp_path / "one_patient.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(ConfigError, match="class 'two' has images from only 1 patient"):
        split_indices(load_dataset(tmp_path / "one_patient.jsonl"), 0.3, 0)


def test_npz_arrays_must_match(npz, tmp_path) -> None:
    with np.load(npz) as archive:
        arrays = {k: archive[k] for k in archive.files}
    np.savez(tmp_path / "bad.npz", **{**arrays, "test_labels": arrays["test_labels"][:-1]})
    with pytest.raises(ConfigError, match=r"'test_images' holds 12 images but 'test_labels' holds 11 labels"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "multi.npz", images=arrays["test_images"], labels=np.zeros((12, 3), int))
    with pytest.raises(ConfigError, match="multi-label"):
        load_dataset(tmp_path / "multi.npz")
    np.savez(tmp_path / "odd.npz", pictures=arrays["test_images"])
    with pytest.raises(ConfigError, match="expected train_images/train_labels"):
        load_dataset(tmp_path / "odd.npz")


def test_an_unknown_spec_says_what_is_expected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist; expected a folder"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="cannot tell what kind of data"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load_dataset("no_such_module_xyz:load")
