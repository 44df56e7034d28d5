"""Datasets: where images and labels come from, how they are read, and how they are split.

One entry point, :func:`load_dataset`, takes an ImageFolder (images or DICOM), a CSV/TSV/JSONL
manifest, a MedMNIST-style ``.npz``, a Hugging Face dataset (parquet/arrow file, ``save_to_disk``
folder, ``imagefolder`` with metadata), a ``module:function`` returning images and labels, or a
dataset YAML naming one of these plus class/display names, column names and a prompt. Every source gives a
:class:`Dataset` whose :meth:`Dataset.image` returns 8-bit RGB (16-bit, float and DICOM images
converted by documented rules). :func:`split_indices` and :func:`fold_indices` honour
predefined splits and patient groups. See ``docs/data.md``.
"""

from __future__ import annotations

from .config import DatasetConfig, read_config
from .dataset import Dataset, DataWarning, subsample
from .dicom import DICOM_EXTRA
from .images import DICOM_SUFFIXES, IMAGE_SUFFIXES, load_image, to_rgb
from .sources import load_dataset, load_image_folder
from .tables import DATASETS_EXTRA
from .splits import fold_indices, split_indices, warn_duplicates

__all__ = [
    "DATASETS_EXTRA",
    "DICOM_EXTRA",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "DataWarning",
    "Dataset",
    "DatasetConfig",
    "fold_indices",
    "load_dataset",
    "load_image",
    "load_image_folder",
    "read_config",
    "split_indices",
    "subsample",
    "to_rgb",
    "warn_duplicates",
]
