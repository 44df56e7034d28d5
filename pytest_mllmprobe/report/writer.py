"""``write_report``: results.json, one PNG per model, profile.png and index.html, atomically."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import remove_stale, staging_dir, swap_dir
from ..errors import ConfigError
from ..results import SCHEMA_VERSION as SUPPORTED_SCHEMA

#: results.json versions this report reads: 1 has no intervals or controls (drawn without bands)
READABLE_SCHEMAS = (1, SUPPORTED_SCHEMA)

MATPLOTLIB_HINT = (
    "matplotlib is not installed, so this report has tables but no plots; "
    'for the plots: pip install "pytest-mllmprobe[report]"'
)
RESERVED_STEMS = frozenset({"profile", "index", "results"})
#: what a report folder holds besides ``*.png``: a folder of only these may be replaced
REPORT_FILES = ("results.json", "index.html")


@dataclass(frozen=True)
class ReportOutcome:
    """What :func:`write_report` did. Iterates (and indexes) like the list of paths written."""

    out_dir: Path
    written: tuple[Path, ...]
    warnings: tuple[str, ...] = ()

    @property
    def plotted(self) -> bool:
        """True when the PNG plots were drawn (matplotlib present)."""
        return any(p.suffix == ".png" for p in self.written)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.written)

    def __len__(self) -> int:
        return len(self.written)

    def __getitem__(self, index: int) -> Path:
        return self.written[index]


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str], *,
                 reference: Mapping[str, Any] | None = None) -> ReportOutcome:
    """Write the report of ``results`` (``Results.to_dict()`` or a loaded results.json) to ``out_dir``.

    Files: ``results.json`` always; ``<label>.png`` per model and ``profile.png`` when matplotlib
    is installed; ``index.html`` always (plots embedded, or tables only with a hint). ``reference``
    (another results dict, or one model's dict) is drawn dashed on the plot of the model with the
    same label. The folder is written as one unit: built beside ``out_dir``, then swapped in, so a
    killed run leaves the old report or the new one, never a mix (:func:`~..atomic.swap_dir`).
    Raises ValueError when ``results`` is not a results dict or ``out_dir`` holds other files.
    """
    _check(results)
    out = Path(out_dir)
    problem = folder_problem(out)
    if problem:
        raise ValueError(problem)
    remove_stale(out.parent if out.parent.is_dir() else Path("."))
    stage = staging_dir(out)
    try:
        names, warnings = _render(results, stage, reference)
        os.chmod(stage, 0o755)
        swap_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ReportOutcome(out_dir=out, written=tuple(out / name for name in names), warnings=tuple(warnings))


def folder_problem(out: Path) -> str | None:
    """Why ``out`` must not be replaced by a report (it holds files a report does not write)."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{str(out)!r} is a file; the report is a folder: give a folder path"
    entries = [p for p in out.iterdir()]
    if not entries:
        return None
    foreign = [p.name for p in entries if p.is_dir() or not (p.name in REPORT_FILES or p.suffix == ".png")]
    if not foreign and (out / "results.json").is_file():
        return None  # an earlier report
    shown = ", ".join(sorted(foreign or [p.name for p in entries])[:4])
    return (f"{str(out)!r} holds files that are not a report of pytest-mllmprobe ({shown}); the report "
            "replaces its whole folder: give an empty or new folder, e.g. out/mllm-report")


def _render(results: Mapping[str, Any], out: Path, reference: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """Write every report file into ``out``; the names written and the warnings."""
    warnings: list[str] = []
    version = results.get("schema_version")
    if version not in READABLE_SCHEMAS:
        warnings.append(f"results schema_version is {version!r}; this report understands "
                        f"{SUPPORTED_SCHEMA}: some parts may be missing")
    written = ["results.json"]
    (out / "results.json").write_bytes(dumps(results).encode("utf-8"))

    models = results["models"]
    names = file_stems(list(models))
    refs = reference_models(reference)
    model_pngs: dict[str, bytes | None] = dict.fromkeys(models)
    profile_png: bytes | None = None
    from . import plots

    if plots.available():
        for label, model in models.items():
            try:
                model_pngs[label] = plots.render_model(model, refs.get(label))
            except Exception as exc:  # a report must not hide the tables because one plot failed
                warnings.append(f"could not draw {names[label]}.png: {type(exc).__name__}: {exc}")
                continue
            (out / f"{names[label]}.png").write_bytes(model_pngs[label])
            written.append(f"{names[label]}.png")
        try:
            if models:
                profile_png = plots.render_profile(results)
                (out / "profile.png").write_bytes(profile_png)
                written.append("profile.png")
        except Exception as exc:
            warnings.append(f"could not draw profile.png: {type(exc).__name__}: {exc}")
    else:
        warnings.append(MATPLOTLIB_HINT)
    for label in refs:
        if label not in models:
            warnings.append(f"reference model {label!r} has no model of that label in these results")

    from .page import render_page

    page = render_page(results, model_pngs, names, profile_png, warnings)
    (out / "index.html").write_bytes(page.encode("utf-8"))
    written.append("index.html")
    return written, warnings


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a saved results.json, checked key by key against :data:`~pytest_mllmprobe.schema.RESULTS`.

    A ``ValueError`` (:class:`~pytest_mllmprobe.errors.ConfigError`) names the file and the first
    key that is missing or of the wrong type; a file of another schema version is refused. One
    model's dict (``results["models"][label]``, e.g. as a reference) and a baseline file (checked
    by :func:`~pytest_mllmprobe.baseline.load_baseline`) are accepted too.
    """
    from ..schema import RESULTS, check, failer

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "format" in data and "models" in data:  # a baseline file
        from ..baseline import load_baseline

        return load_baseline(path, flag="reference")
    fail = failer(str(path), "write it again with --mllm-report or write_report()")
    if isinstance(data, dict) and "models" not in data and "loci" in data:  # one model's dict
        check(data, RESULTS["models"].value, "", fail)
        return data
    _check(data, what=str(path))
    version = data.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise ConfigError(
            f"{path}: schema_version is {version!r}, this version of pytest-mllmprobe reads "
            f"{' and '.join(map(str, READABLE_SCHEMAS))}; write it again with this version (--mllm-report or write_report())"
        )
    check(data, RESULTS, "", fail)
    return data


def reference_models(reference: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``label -> model dict`` from a whole results dict or from a single model dict."""
    if not reference:
        return {}
    if isinstance(reference.get("models"), Mapping):
        return dict(reference["models"])
    if "loci" in reference:
        return {str(reference.get("label")): dict(reference)}
    raise ValueError("reference must be a results dict (with 'models') or one model's dict (with 'loci')")


def file_stems(labels: list[str]) -> dict[str, str]:
    """A safe, unique file stem per model label (``<label>.png``), never profile/index/results."""
    stems: dict[str, str] = {}
    used: set[str] = set(RESERVED_STEMS)
    for label in labels:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._") or "model"
        if stem.lower() in RESERVED_STEMS:
            stem += "-model"
        candidate, n = stem, 2
        while candidate.lower() in used:
            candidate, n = f"{stem}-{n}", n + 1
        used.add(candidate.lower())
        stems[label] = candidate
    return stems


def dumps(results: Mapping[str, Any]) -> str:
    """Strict JSON: NaN/inf become null, numpy scalars and arrays become numbers and lists."""
    return json.dumps(_plain(results), indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy, without importing it
        return _plain(value.tolist())
    return value


def _check(results: Any, what: str = "results") -> None:
    if not isinstance(results, Mapping) or not isinstance(results.get("models"), Mapping):
        raise ValueError(
            f"{what}: expected the dict of Results.to_dict() (a saved results.json) with a "
            f"'models' mapping; got {type(results).__name__}"
            + (f" with keys {sorted(results)[:6]}" if isinstance(results, Mapping) else "")
        )


