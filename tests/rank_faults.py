"""A pytest plugin for the torch.distributed tests, loaded with ``-p tests.rank_faults``.

``RANK_RECORD=<folder>``: every rank writes the images and loci it extracted last (``rank<R>.json``).
``RANK_FAULT=raise``: rank 1's extraction raises a ConfigError (bad input on its shard).
``RANK_FAULT=exit``: rank 1 dies in its extraction (``os._exit``), as a killed process would.
``RANK_FAULT_RANK=<r>`` plants the fault on rank ``r`` instead of 1; ``RANK_FAULT_MODEL=<label>``
only in that model's extraction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_mllmprobe import engine
from pytest_mllmprobe.errors import ConfigError

_extract = engine.ModelRun.extract


def _planted(self, loaded, prompt, need=None, rows=None):  # type: ignore[no-untyped-def]
    rank = os.environ.get("RANK", "0")
    fault = os.environ.get("RANK_FAULT", "") if rank == os.environ.get("RANK_FAULT_RANK", "1") else ""
    if os.environ.get("RANK_FAULT_MODEL", self.model_plan.spec.label) != self.model_plan.spec.label:
        fault = ""
    if fault == "raise":
        raise ConfigError(f"planted: image {rows[0]} of rank {rank}'s shard cannot be read")
    if fault == "exit":
        os._exit(9)
    features = _extract(self, loaded, prompt, need, rows)
    record = os.environ.get("RANK_RECORD")
    if record:
        shown = rows if rows is not None else range(len(self.dataset))
        Path(record, f"rank{rank}.json").write_text(json.dumps(
            {"rows": [shown.start, shown.stop], "loci": sorted(features.loci),
             "answer": features.answer_scores is not None}))
    return features


engine.ModelRun.extract = _planted
