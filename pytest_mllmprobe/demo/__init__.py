"""The bundled demo: a tiny trained LLaVA-architecture model and a synthetic lesion dataset.

Rebuild both with ``python -m pytest_mllmprobe.demo.build`` (deterministic).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL = DEMO_DIR / "model"
DEMO_DATA = DEMO_DIR / "data"
