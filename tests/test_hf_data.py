"""Hugging Face datasets as data: parquet and arrow files, save_to_disk folders, imagefolder.

Every table here is written by ``datasets`` itself (``to_parquet``, ``save_to_disk``) from the same
real handwritten digits (scikit-learn) that a plain class folder holds; each format must load to
the same labels, pixels and patient groups as that folder, and run through the engine to the
same numbers. Bad inputs are :class:`ConfigError` s that name the file, the columns and the fix,
and exit code 4 from pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytest_mllmprobe.data import DATASETS_EXTRA, Dataset, load_dataset, split_indices
from pytest_mllmprobe.errors import ConfigError

from .conftest import subprocess_env
from .test_data import NAMES, PER_CLASS, _patient, digits, folder  # noqa: F401 - the folder tests' 36 digits
from .test_plugin_options import _usage_error

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _files(folder: Path, digits) -> list[Path]:
    return [folder / NAMES[label] / f"{i:03d}.png" for i, label in enumerate(digits[1])]


def _features(**extra):
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES),
                     "patient_id": Value("string"), **extra})


def hf_dataset(folder: Path, digits, rows: slice = slice(None), *, embed: bool = True, **columns):
    """The folder's images as a ``datasets.Dataset``: the PNG bytes themselves (or only their paths)."""
    files = _files(folder, digits)[rows]
    images = [{"bytes": f.read_bytes(), "path": f.name} if embed else str(f) for f in files]
    data = {"image": images, "label": digits[1][rows].tolist(),
            "patient_id": [_patient(i) for i in range(len(digits[1]))][rows], **columns}
    extra = {k: datasets.Value("string") for k in columns}
    return datasets.Dataset.from_dict(data, features=_features(**extra))


@pytest.fixture(scope="module")
def formats(folder, digits) -> dict[str, Path]:
    """Every Hugging Face format, written once: kind -> what --mllm-data is given."""
    root = folder.parent
    whole = hf_dataset(folder, digits)
    whole.to_parquet(str(root / "digits.parquet"))
    hf_dataset(folder, digits, embed=False).to_parquet(str(root / "paths.parquet"))
    whole.save_to_disk(str(root / "saved"))
    test = np.zeros(len(digits[1]), bool)
    test[[i for c in range(3) for i in np.flatnonzero(digits[1] == c)[-3:]]] = True  # each class's last patient
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    datasets.DatasetDict(train=whole.select(train_rows), test=whole.select(test_rows)).save_to_disk(str(root / "dict"))
    (root / "shards" / "data").mkdir(parents=True)
    whole.select(train_rows).to_parquet(str(root / "shards" / "data" / "train-00000-of-00001.parquet"))
    whole.select(test_rows).to_parquet(str(root / "shards" / "data" / "test-00000-of-00001.parquet"))
    rows = [(f.relative_to(folder).as_posix(), NAMES[label], _patient(i))
            for i, (f, label) in enumerate(zip(_files(folder, digits), digits[1]))]
    (folder / "metadata.csv").write_text("file_name,label,patient_id\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    jsonl = root / "jsonl"
    for (name, label, patient), file in zip(rows, _files(folder, digits)):
        (jsonl / Path(name).parent).mkdir(parents=True, exist_ok=True)
        (jsonl / name).write_bytes(file.read_bytes())
    (jsonl / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "patient_id": p}) + "\n" for n, _, p in rows))
    for i, (file, is_test) in enumerate(zip(_files(folder, digits), test)):  # imagefolder's split folders
        target = root / "splits" / ("test" if is_test else "train") / file.parent.name / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    arrow = next((root / "saved").glob("*.arrow"))
    return {"parquet": root / "digits.parquet", "parquet-paths": root / "paths.parquet", "arrow": arrow,
            "save_to_disk": root / "saved", "dataset_dict": root / "dict", "shards": root / "shards",
            "imagefolder-csv": folder, "imagefolder-jsonl": jsonl, "split-folders": root / "splits", "_test": test}


def _content(dataset: Dataset) -> list[tuple[str, bytes, str]]:
    """Order-free content: (class name, RGB bytes, patient or "") per sample, sorted."""
    groups = dataset.groups if dataset.groups is not None else [""] * len(dataset)
    return sorted((dataset.class_names[dataset.labels[i]], dataset.image(i).tobytes(), str(groups[i]))
                  for i in range(len(dataset)))


def _expected(folder: Path, digits, rows: np.ndarray | None = None, *, patients: bool = True) -> list:
    files = _files(folder, digits)
    rows = range(len(files)) if rows is None else rows
    return sorted((NAMES[digits[1][i]], Image.open(files[i]).convert("RGB").tobytes(),
                   _patient(i) if patients else "") for i in rows)


NO_PATIENTS = ("split-folders",)  # a folder layout has no place for patient ids


# --- every format loads the same samples -----------------------------------------------------

KINDS = ["parquet", "parquet-paths", "arrow", "save_to_disk", "dataset_dict", "shards", "imagefolder-csv",
         "imagefolder-jsonl", "split-folders"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_hugging_face_format_loads_the_same_labels_pixels_and_patients(kind, formats, folder, digits) -> None:
    data = load_dataset(formats[kind])
    assert data.class_names == tuple(NAMES)  # the ClassLabel's names, in its order
    assert np.bincount(data.labels).tolist() == [PER_CLASS] * 3
    assert _content(data) == _expected(folder, digits, patients=kind not in NO_PATIENTS)
    assert len(set(data.ids)) == len(data)
    assert data.fingerprint == load_dataset(formats[kind]).fingerprint


def test_table_images_are_read_on_demand_in_any_order(formats) -> None:
    for kind in ("parquet", "save_to_disk"):
        data = load_dataset(formats[kind])
        assert data.paths == ("",) * len(data) and data.source in ("parquet", "save_to_disk")
        forward = [data.image(i).tobytes() for i in range(len(data))]
        order = np.random.default_rng(0).permutation(len(data))
        assert [data.image(i).tobytes() for i in order] == [forward[i] for i in order]
    assert load_dataset(formats["parquet-paths"]).paths[0].endswith("nil/000.png")  # an Image feature holding paths


def test_ids_name_the_file_and_row(formats) -> None:
    assert load_dataset(formats["parquet"]).ids[:2] == ("digits.parquet:0", "digits.parquet:1")
    assert load_dataset(formats["dataset_dict"]).ids[0] == "train/data-00000-of-00001.arrow:0"
    last = int((~formats["_test"]).sum()) - 1  # shards in name order: test, then train
    assert load_dataset(formats["shards"]).ids[-1] == f"data/train-00000-of-00001.parquet:{last}"
    assert load_dataset(formats["imagefolder-csv"]).ids[0] == "nil/000.png"


def test_splits_come_from_the_dataset_dict_the_shard_names_or_a_split_column(formats, folder, digits, tmp_path) -> None:
    test = formats["_test"]
    for kind in ("dataset_dict", "shards", "split-folders"):
        data = load_dataset(formats[kind])
        assert data.predefined_split.sum() == test.sum()
        test_part = data.subset(np.flatnonzero(data.predefined_split))
        assert _content(test_part) == _expected(folder, digits, np.flatnonzero(test), patients=kind not in NO_PATIENTS)
        train, held_out = split_indices(data, 0.5, 0)
        assert np.array_equal(held_out, np.flatnonzero(data.predefined_split))
    split = ["test" if t else "train" for t in test]
    hf_dataset(folder, digits, split=split).to_parquet(str(tmp_path / "split.parquet"))
    data = load_dataset(tmp_path / "split.parquet")
    assert _content(data.subset(np.flatnonzero(data.predefined_split))) == _expected(folder, digits, np.flatnonzero(test))
    assert load_dataset(formats["parquet"]).predefined_split is None


def test_string_labels_plain_bytes_and_columns_named_in_the_yaml(folder, digits, tmp_path) -> None:
    from datasets import Features, Value

    files = _files(folder, digits)
    table = datasets.Dataset.from_dict(
        {"scan": [f.read_bytes() for f in files], "diagnosis": [NAMES[k] for k in digits[1]],
         "subject": [_patient(i) for i in range(len(files))]},
        features=Features({"scan": Value("binary"), "diagnosis": Value("string"), "subject": Value("string")}),
    )
    table.to_parquet(str(tmp_path / "plain.parquet"))
    with pytest.raises(ConfigError, match=r"no image column 'image'.*\['scan', 'diagnosis', 'subject'\].*image_column"):
        load_dataset(tmp_path / "plain.parquet")
    (tmp_path / "plain.yaml").write_text(
        "source: plain.parquet\nimage_column: scan\nlabel_column: diagnosis\ngroup_column: subject\n"
    )
    data = load_dataset(tmp_path / "plain.yaml")
    assert data.class_names == tuple(sorted(NAMES))  # string labels: sorted
    assert _content(data) == _expected(folder, digits)


# --- bad inputs ------------------------------------------------------------------------------

def test_a_table_without_an_image_or_label_column_lists_its_columns(folder, digits, tmp_path) -> None:
    whole = hf_dataset(folder, digits)
    whole.remove_columns("label").to_parquet(str(tmp_path / "nolabel.parquet"))
    with pytest.raises(ConfigError, match=r"nolabel.parquet' has no label column 'label'; its columns are "
                                          r"\['image', 'patient_id'\]: name the label column with label_column"):
        load_dataset(tmp_path / "nolabel.parquet")
    whole.remove_columns("image").to_parquet(str(tmp_path / "noimage.parquet"))
    with pytest.raises(ConfigError, match=r"noimage.parquet' has no image column 'image'; its columns are "
                                          r"\['label', 'patient_id'\]: name the image column with image_column"):
        load_dataset(tmp_path / "noimage.parquet")
    (tmp_path / "typo.yaml").write_text("source: nolabel.parquet\nlabel_column: diagnosis\n")
    with pytest.raises(ConfigError, match=r"no 'diagnosis' column \(set by label_column\)"):
        load_dataset(tmp_path / "typo.yaml")


def test_labels_outside_the_class_list_are_named_with_their_split(folder, digits, tmp_path) -> None:
    whole = hf_dataset(folder, digits)
    unlabelled = whole.select(range(30, 36)).map(lambda row: {"label": -1})  # an unlabelled test split
    datasets.DatasetDict(train=whole.select(range(30)), test=unlabelled).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError) as error:
        load_dataset(tmp_path / "dict")
    message = str(error.value)
    assert message.startswith("arrow file ") and "test/data-00000-of-00001.arrow' row 0: " in message
    assert "label(s) not in the class list ['nil', 'one', 'two']" in message
    assert "split 'test': [-1], on 6 row(s) in all" in message and "'train'" not in message


def test_splits_with_different_class_lists_are_refused(folder, digits, tmp_path) -> None:
    whole = hf_dataset(folder, digits)
    renamed = whole.select(range(30, 36)).cast_column("label", datasets.ClassLabel(names=["zero", "one", "two"]))
    datasets.DatasetDict(train=whole.select(range(30)), test=renamed).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match=r"names its classes \['zero', 'one', 'two'\] but .* \['nil', 'one', 'two'\]"):
        load_dataset(tmp_path / "dict")


def test_a_misspelt_patient_column_is_refused_not_ignored(folder, digits, tmp_path) -> None:
    hf_dataset(folder, digits).rename_column("patient_id", "patientid").to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ConfigError, match="column 'patientid' looks like a group column.*group_column: patientid"):
        load_dataset(tmp_path / "p.parquet")
    (tmp_path / "p.yaml").write_text("source: p.parquet\nignore_columns: [patientid]\n")
    assert load_dataset(tmp_path / "p.yaml").groups is None


def test_column_keys_that_do_not_fit_the_source_are_refused(formats, tmp_path) -> None:
    (tmp_path / "m.csv").write_text("path,label\n")
    (tmp_path / "a.yaml").write_text("source: m.csv\nimage_column: scan\n")
    with pytest.raises(ConfigError, match="image_column applies to parquet/arrow tables"):
        load_dataset(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(f"source: {formats['parquet']}\npath_column: file\n")
    with pytest.raises(ConfigError, match="path_column applies to manifests and imagefolder metadata"):
        load_dataset(tmp_path / "b.yaml")


def test_imagefolder_rows_are_checked(folder, tmp_path) -> None:
    import shutil

    root = Path(shutil.copytree(folder, tmp_path / "copy"))
    text = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(text.replace("nil/001.png", "nil/missing.png"))
    with pytest.raises(ConfigError, match=r"metadata.csv' line 3: file 'nil/missing.png' does not exist"):
        load_dataset(root)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(folder / "nil" / "000.png", flat / "a.png")
    (flat / "metadata.csv").write_text("file_name,patient_id\na.png,p1\n")
    with pytest.raises(ConfigError, match="'a.png' lies in no class folder and the metadata has no 'label' column"):
        load_dataset(flat)


def test_a_corrupt_table_image_fails_or_is_skipped_and_recorded(folder, digits, tmp_path) -> None:
    from pytest_mllmprobe.data.images import SKIP_HINT

    whole = hf_dataset(folder, digits)
    broken = whole.map(lambda row, i: {"image": {"bytes": b"not a png", "path": None}} if i == 5 else row,
                       with_indices=True, features=whole.features)
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(ConfigError, match=r"broken.parquet' row 5: cannot read image 'broken.parquet:5'") as error:
        load_dataset(tmp_path / "broken.parquet")
    assert SKIP_HINT in str(error.value)
    data = load_dataset(tmp_path / "broken.parquet", skip_bad_images=True)
    assert [sample_id for sample_id, _ in data.skipped] == ["broken.parquet:5"] and len(data) == 3 * PER_CLASS - 1


def test_a_folder_of_both_tables_and_images_is_refused(formats, folder, tmp_path) -> None:
    import shutil

    root = Path(shutil.copytree(folder / "nil", tmp_path / "mixed" / "nil"))
    shutil.copy(formats["parquet"], root.parent / "digits.parquet")
    with pytest.raises(ConfigError, match=r"holds both parquet/arrow tables \('digits.parquet'\) and image files"):
        load_dataset(root.parent)


def test_without_pyarrow_a_table_names_the_extra(formats, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow now raises ImportError
    with pytest.raises(ConfigError, match="digits.parquet") as error:
        load_dataset(formats["parquet"])
    assert DATASETS_EXTRA in str(error.value)
    assert len(load_dataset(formats["imagefolder-csv"])) == 3 * PER_CLASS  # imagefolder needs no pyarrow


def test_bad_hugging_face_data_is_a_usage_error(pytester: pytest.Pytester, folder, digits) -> None:
    whole = hf_dataset(folder, digits)
    whole.remove_columns("label").to_parquet(str(pytester.path / "nolabel.parquet"))
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-data=nolabel.parquet", "-p", "no:cacheprovider")
    _usage_error(result, "nolabel.parquet' has no label column 'label'; its columns are *'image', 'patient_id'*"
                         "label_column: <column> in a dataset YAML*")
    unlabelled = whole.select(range(30, 36)).map(lambda row: {"label": -1})
    datasets.DatasetDict(train=whole.select(range(30)), test=unlabelled).save_to_disk(str(pytester.path / "dict"))
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-data=dict", "-p", "no:cacheprovider")
    _usage_error(result, "*test*arrow' row 0: label(s) not in the class list *'nil', 'one', 'two'*split 'test': *-1*, "
                         "on 6 row(s) in all*")


# --- memory ----------------------------------------------------------------------------------

def test_reading_holds_a_few_rows_of_a_parquet_file_not_the_file(tmp_path) -> None:
    """Peak RSS growth does not grow with the file: 4x the images, (almost) the same peak.

    Measured in fresh processes by benchmarks/bench_table_reading.py; the same reading of the
    larger file with pyarrow.parquet.read_table shows the measurement sees a file held whole.
    """
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_table_reading as b; from pathlib import Path;"
        "out = {};\n"
        "for n in (400, 1600):\n"
        "    p = Path(sys.argv[2]) / f'{n}.parquet'; b.write_parquet(p, n, 96, 0)\n"
        "    out[n] = dict(mb=p.stat().st_size / 2**20, lazy=b._child('lazy', p)['peak_growth_mb'])\n"
        "out['whole'] = b._child('whole', p)['peak_growth_mb']; print(json.dumps(out))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), str(tmp_path)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    small, big = out["400"], out["1600"]
    more = big["mb"] - small["mb"]  # ~32 MB more images, in datasets' own row groups (one here)
    assert more > 25
    assert big["lazy"] - small["lazy"] < 0.25 * more, out
    assert big["lazy"] < 0.5 * big["mb"], out
    assert out["whole"] > big["mb"], out  # reading the file whole shows up in the same measurement


# --- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder

    root = tmp_path_factory.mktemp("hf-lesions")
    write_image_folder(make_images(16, seed=11), root / "folder")
    return root


def _probe(spec: str | Path) -> dict[str, float]:
    from pytest_mllmprobe import run

    result = run("demo", data=str(spec), test_size=0.5)["demo"]
    return {name: locus.accuracy for name, locus in result.loci.items()}


def test_hugging_face_formats_give_the_same_numbers_as_the_folder(lesions) -> None:
    import shutil

    plain = lesions / "folder"
    files = sorted(plain.rglob("*.png"))  # the folder's own order: class, then name
    names = sorted({f.parent.name for f in files})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
         "label": [names.index(f.parent.name) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
    )
    table.to_parquet(str(lesions / "lesions.parquet"))
    table.save_to_disk(str(lesions / "saved"))
    imagefolder = Path(shutil.copytree(plain, lesions / "imagefolder"))
    (imagefolder / "metadata.csv").write_text(
        "file_name,label\n" + "".join(f"{f.relative_to(plain).as_posix()},{f.parent.name}\n" for f in files)
    )
    baseline = _probe(plain)
    assert baseline["answer"] >= 0.8  # the demo model reads these images: the numbers mean something
    for spec in (lesions / "lesions.parquet", lesions / "saved", imagefolder):
        assert _probe(spec) == baseline, spec
