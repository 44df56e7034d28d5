"""The dataset YAML: a source plus class names, display names, prompt and column names.

.. code-block:: yaml

    source: labels.csv              # folder, .csv/.jsonl, .npz, .parquet/.arrow, or module:function
    class_names: [normal, benign, malignant]   # order and subset (a mapping also renames)
    display_names: {normal: "no lesion"}       # the names the prompt lists
    prompt: "Which finding is shown? Options: {options}."
    prompts: ["What does the scan show? Options: {options}."]   # other wordings the answer is scored under
    group_column: patient_id         # manifest columns (defaults: path, label, group, split)
    split_column: fold
    image_column: img                # parquet/arrow/save_to_disk tables (default: image)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, close_matches

KEYS = (
    "source", "class_names", "display_names", "prompt", "prompts",
    "path_column", "image_column", "label_column", "group_column", "split_column", "ignore_columns",
)
COLUMN_KEYS = ("path_column", "image_column", "label_column", "group_column", "split_column", "ignore_columns")
ENTRY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Columns:
    """Column names of manifests and tables; ``explicit`` lists those the YAML set (they must exist)."""

    path: str = "path"
    image: str = "image"
    label: str = "label"
    group: str = "group"
    split: str = "split"
    ignore: tuple[str, ...] = ()
    explicit: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetConfig:
    """A parsed dataset YAML; ``source`` is resolved against the YAML's folder."""

    file: str
    source: str
    class_names: list[str] | dict[str, str] | None = None
    display_names: dict[str, str] | None = None
    prompt: str | None = None
    columns: Columns = field(default_factory=Columns)
    #: other wordings of the question, each with ``{options}``: the answer is also scored under them
    prompts: tuple[str, ...] = ()


def is_entry(spec: str) -> bool:
    """``module:function`` (and not an existing path such as ``C:data``)."""
    return bool(ENTRY_PATTERN.match(spec)) and not Path(spec).exists()


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read dataset file {str(path)!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"dataset file {str(path)!r} is not valid YAML ({exc}); fix the syntax"
        ) from exc


def read_config(path: str | Path) -> DatasetConfig:
    """Parse and check a dataset YAML; every problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    raw = _load_yaml(path)
    where = f"dataset file {str(path)!r}"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} must be a mapping with at least 'source: <folder, manifest, .npz or "
            f"module:function>', got {type(raw).__name__}"
        )
    for key in raw:
        if str(key) not in KEYS:
            raise ConfigError(
                f"{where}: unknown key {str(key)!r}{close_matches(str(key), KEYS)}; valid keys: "
                f"{', '.join(KEYS)}"
            )
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(
            f"{where}: 'source' is required and must name a folder, a .csv/.jsonl manifest, an .npz, "
            "a .parquet/.arrow file or module:function (paths relative to the YAML file)"
        )
    source = source.strip()
    if not is_entry(source):
        resolved = Path(source).expanduser()
        if not resolved.is_absolute():
            resolved = path.parent / resolved
        if resolved.suffix.lower() in (".yaml", ".yml"):
            raise ConfigError(
                f"{where}: source {source!r} is another dataset YAML; point source at the data "
                "itself (a folder, manifest, .npz or module:function)"
            )
        source = str(resolved)
    class_names = raw.get("class_names")
    if class_names is not None:
        class_names = _names(class_names, where)
    display = raw.get("display_names")
    if display is not None:
        if not isinstance(display, dict) or not display:
            raise ConfigError(
                f"{where}: display_names must map class names to the names the prompt uses, "
                "e.g. {malignant: 'malignant tumour'}"
            )
        display = {str(k): _text(v, f"{where}: display_names[{k!r}]") for k, v in display.items()}
    prompt = raw.get("prompt")
    if prompt is not None:
        prompt = _text(prompt, f"{where}: prompt")
        if "{options}" not in prompt:
            raise ConfigError(
                f"{where}: prompt {prompt!r} has no '{{options}}' placeholder; add it where the "
                "class names should be listed"
            )
    prompts = raw.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or not prompts:
            raise ConfigError(
                f"{where}: prompts must be a list of question wordings, each with '{{options}}', e.g. "
                "[\"What does the scan show? Options: {options}.\"]"
            )
        prompts = [_text(p, f"{where}: prompts[{i}]") for i, p in enumerate(prompts)]
        for i, text in enumerate(prompts):
            if "{options}" not in text:
                raise ConfigError(
                    f"{where}: prompts[{i}] {text!r} has no '{{options}}' placeholder; add it where the "
                    "class names should be listed"
                )
    return DatasetConfig(str(path), source, class_names, display, prompt, _columns(raw, where),
                         tuple(prompts or ()))


def _text(value: Any, what: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    raise ConfigError(f"{what} must be a non-empty string, got {value!r}")


def _names(value: Any, where: str) -> list[str] | dict[str, str]:
    if isinstance(value, dict) and value:
        return {str(k): _text(v, f"{where}: class_names[{k!r}]") for k, v in value.items()}
    if isinstance(value, list) and value:
        return [_text(v, f"{where}: class_names entry") for v in value]
    raise ConfigError(
        f"{where}: class_names must be a list of classes in the order wanted (a subset keeps only "
        f"those), or a mapping label -> name; got {value!r}"
    )


def _columns(raw: dict[str, Any], where: str) -> Columns:
    values: dict[str, Any] = {}
    for key in ("path_column", "image_column", "label_column", "group_column", "split_column"):
        if key in raw:
            values[key.removesuffix("_column")] = _text(raw[key], f"{where}: {key}")
    ignore = raw.get("ignore_columns", ())
    if isinstance(ignore, str):
        ignore = [ignore]
    if not isinstance(ignore, (list, tuple)):
        raise ConfigError(f"{where}: ignore_columns must be a list of column names, got {ignore!r}")
    return Columns(
        **values, ignore=tuple(str(c) for c in ignore),
        explicit=tuple(k for k in COLUMN_KEYS if k in raw),
    )


def read_sidecar_names(npz: Path) -> list[str | None] | None:
    """Class names for an ``.npz`` from ``<name>.yaml`` beside it, by label index; ``None`` if absent.

    The file holds a list, or a mapping with ``class_names`` (list, or index -> name) or
    MedMNIST's ``label`` (index -> name).
    """
    for suffix in (".yaml", ".yml"):
        path = npz.with_suffix(suffix)
        if path.is_file():
            break
    else:
        return None
    raw = _load_yaml(path)
    where = f"class-name file {str(path)!r}"
    if isinstance(raw, dict):
        if "class_names" not in raw and "label" not in raw and "source" in raw:
            return None  # a dataset YAML without class names
        raw = raw.get("class_names", raw.get("label"))
    if isinstance(raw, list) and raw:
        return [str(v) for v in raw]
    if isinstance(raw, dict) and raw:
        try:
            by_index = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: class name keys must be label indices 0, 1, ...; got {list(raw)}"
            ) from None
        if min(by_index) < 0:
            raise ConfigError(f"{where}: label indices must be 0 or more; got {min(by_index)}")
        return [by_index.get(k) for k in range(max(by_index) + 1)]
    raise ConfigError(
        f"{where} must hold the class names by label index: a list, or 'class_names:' "
        "(list or index -> name), or MedMNIST's 'label:' mapping"
    )
