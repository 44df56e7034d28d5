"""``write_report``: results.json, one PNG per model, profile.png and index.html, atomically."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes

MATPLOTLIB_HINT = (
    "matplotlib is not installed, so this report has tables but no plots; "
    'for the plots: pip install "pytest-mllmprobe[report]"'
)
SUPPORTED_SCHEMA = 1
RESERVED_STEMS = frozenset({"profile", "index", "results"})


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
    same label. Raises ValueError only when ``results`` is not a results dict.
    """
    _check(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    version = results.get("schema_version")
    if version != SUPPORTED_SCHEMA:
        warnings.append(f"results schema_version is {version!r}; this report understands "
                        f"{SUPPORTED_SCHEMA}: some parts may be missing")
    written = [atomic_write_bytes(out / "results.json", dumps(results).encode("utf-8"))]

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
            written.append(atomic_write_bytes(out / f"{names[label]}.png", model_pngs[label]))
        try:
            if models:
                profile_png = plots.render_profile(results)
                written.append(atomic_write_bytes(out / "profile.png", profile_png))
        except Exception as exc:
            warnings.append(f"could not draw profile.png: {type(exc).__name__}: {exc}")
    else:
        warnings.append(MATPLOTLIB_HINT)
    for label in refs:
        if label not in models:
            warnings.append(f"reference model {label!r} has no model of that label in these results")

    from .page import render_page

    page = render_page(results, model_pngs, names, profile_png, warnings)
    written.append(atomic_write_bytes(out / "index.html", page.encode("utf-8")))
    return ReportOutcome(out_dir=out, written=tuple(written), warnings=tuple(warnings))


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a saved results.json (ValueError with the file name when it is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    try:
        _check(data, what=str(path))
    except ValueError:
        if isinstance(data, dict) and "loci" in data:  # one model's dict, e.g. as a reference
            return data
        raise
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


