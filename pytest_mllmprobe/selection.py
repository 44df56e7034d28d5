"""Only what a run needs: the loci a selection of tests reads, and where the forward may stop.

A run asked for some of a model's tests (``-k``, ``-m``, node ids, ``--lf``, or
``run(..., tests=...)``) extracts only the loci those tests read: each locus test reads its
locus, each stage rule the loci its figures are made of (:func:`stage_reads`). The forward
stops after the hook of the last needed locus, so a vision-only selection never runs the
language model; the answer (last-position logits) is read only when a selected test needs it.

Some outputs promise the whole model (a saved or updated baseline, a report, a comparison, the
random-initialisation control, generated answers, a test of your own that reads
``mllm_results``): they force a full extraction, and :attr:`Selection.reason` says why
(:func:`whole_model_reason`).

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, close_matches

ANSWER = "answer"
STAGES = ("vision", "connector", "llm", "answer")

#: shown in the summary when a model's evaluation read only some of its loci
PARTIAL_NOTE = "only the selected tests' loci were extracted ({n} of {total}; skipped, not selected: {skipped})"
#: shown when the forward could not stop early and ran to the end
NO_STOP_NOTE = ("the forward ran to the end: {why}; only the selected loci were pooled")
#: shown when the data-flow check was left out
NO_FLOW_NOTE = ("the data-flow check of the stage map stopped before the language model (the selection "
                "reads none of it): the connector is checked to read the vision encoder, not the LLM to read it")


@dataclass(frozen=True)
class Need:
    """What one extraction must produce: pooled ``loci`` and, with ``answer``, the model's own
    answer scores (which need the whole language model and its last logits)."""

    loci: frozenset[str]
    answer: bool

    def missing_from(self, loci: Iterable[str], answer: bool) -> Need:
        """What is still to extract when ``loci`` (and the answer, if ``answer``) are at hand."""
        return Need(self.loci - set(loci), self.answer and not answer)

    @property
    def empty(self) -> bool:
        return not self.loci and not self.answer


@dataclass(frozen=True)
class Selection:
    """The tests asked of one model and the loci they read.

    ``tests``: locus and ``stage.<stage>`` test names; ``need``: what the extraction produces;
    ``reason``: why every locus is extracted though only some tests were selected (``None``
    when the selection was honoured or asked for everything)."""

    tests: frozenset[str]
    need: Need
    all_loci: tuple[str, ...]
    reason: str | None = None

    @property
    def full(self) -> bool:
        return set(self.need.loci) | ({ANSWER} if self.need.answer else set()) >= set(self.all_loci)

    @property
    def stages(self) -> frozenset[str]:
        """The stage rules to judge: those selected (all of them for a full selection)."""
        if self.full:
            return frozenset(STAGES)
        return frozenset(t.split(".", 1)[1] for t in self.tests if t.startswith("stage."))

    @property
    def skipped(self) -> list[str]:
        """Loci not extracted, in pipeline order."""
        have = set(self.need.loci) | ({ANSWER} if self.need.answer else set())
        return [n for n in self.all_loci if n not in have]

    def note(self) -> str | None:
        if self.full:
            return None
        skipped = self.skipped
        shown = ", ".join(skipped[:6]) + (f" and {len(skipped) - 6} more" if len(skipped) > 6 else "")
        return PARTIAL_NOTE.format(n=len(self.all_loci) - len(skipped), total=len(self.all_loci), skipped=shown)

    def to_dict(self) -> dict[str, Any]:
        return {"full": self.full, "tests": sorted(self.tests), "loci": sorted(self.need.loci),
                "answer": self.need.answer, "skipped": self.skipped, "reason": self.reason}


def stage_reads(stage_map: Any) -> dict[str, frozenset[str]]:
    """The loci each stage rule reads (:func:`pytest_mllmprobe.verdicts.judge`):

    * ``vision``: the curve ``vision.0`` .. the deepest layer the connector reads (FHS_V, the dip,
      the consumed layer's score and selectivity);
    * ``connector``: the consumed vision layers (the best of them is the reference) and ``connector``;
    * ``llm``: ``connector`` and the main readout's curve from ``llm_entry`` to the last layer;
    * ``answer``: ``answer`` and every layer's last token (``P(llm.<last>.last)``, the logit lens).
    """
    consumed = stage_map.consumed_vision_layers
    n = len(stage_map.llm_layers)
    readout = "image" if "image" in stage_map.llm_readouts else "last"
    return {
        "vision": frozenset(f"vision.{i}" for i in range(max(consumed) + 1)),
        "connector": frozenset({*(f"vision.{i}" for i in consumed), "connector"}),
        "llm": frozenset({"connector", *(f"llm.{i}.{readout}" for i in range(stage_map.llm_entry, n))}),
        "answer": frozenset({ANSWER, *(f"llm.{i}.last" for i in range(n))}),
    }


def everything(stage_map: Any, reason: str | None = None, tests: Iterable[str] = ()) -> Selection:
    """The selection of every test of the model."""
    loci = tuple(stage_map.loci)
    return Selection(frozenset(tests) or frozenset(test_names(stage_map)),
                     Need(frozenset(n for n in loci if n != ANSWER), True), loci, reason)


def test_names(stage_map: Any) -> list[str]:
    """Every test name of a model: its loci and its stage rules."""
    return [*stage_map.loci, *(f"stage.{s}" for s in STAGES)]


def select(stage_map: Any, tests: Iterable[str], label: str = "", *, reason: str | None = None) -> Selection:
    """The selection of ``tests`` (locus and ``stage.<stage>`` names) of one model.

    ``reason`` (an output that promises the whole model) extracts everything and keeps the reason.
    """
    tests = frozenset(tests)
    known = test_names(stage_map)
    for test in sorted(tests):
        if test not in known:
            raise ConfigError(
                f"tests={sorted(tests)}: model {label or stage_map.family!r} has no test {test!r}"
                f"{close_matches(test, known)}; give locus names ({known[0]}, connector, ...) or stage.<stage>"
            )
    if reason is not None:
        return everything(stage_map, reason, tests)
    reads = stage_reads(stage_map)
    needed: set[str] = set()
    for test in tests:
        needed |= reads[test.split(".", 1)[1]] if test.startswith("stage.") else {test}
    return Selection(tests, Need(frozenset(needed - {ANSWER}), ANSWER in needed), tuple(stage_map.loci))


def whole_model_reason(settings: Any, report: str | None = None) -> str | None:
    """Why the run must extract every locus whatever the selection, or ``None``.

    Outputs that stand for the whole model: a baseline written (a later gate would compare
    loci that were never measured), a report, a comparison with a baseline or another model
    (its paired tests and power read every locus), the random-initialisation control, and
    generated answers."""
    if settings.save_baseline or settings.update_baseline:
        flag = "--mllm-save-baseline" if settings.save_baseline else "--mllm-update-baseline"
        return f"{flag} writes the whole model's baseline"
    if report:
        return "--mllm-report draws the whole model"
    if settings.compare_to is not None:
        return f"--mllm-compare-to {settings.compare_to} compares whole models"
    if settings.baseline:
        return "--mllm-baseline compares the whole model with its baseline"
    if "random-init" in settings.controls:
        return "--mllm-controls random-init probes the whole random twin"
    if settings.answer == "generate":
        return "--mllm-answer generate generates the whole model's answers"
    return None


def hook_order(stage_map: Any) -> list[str]:
    """Pooled locus names in the order their hooks fire in one forward."""
    return [n for n in stage_map.loci if n != ANSWER]


def stop_after(stage_map: Any, need: Need) -> str | None:
    """The locus after whose hook the forward may stop; ``None``: run to the end (the answer is
    needed, or nothing is)."""
    if need.answer or not need.loci:
        return None
    order = [n for n in hook_order(stage_map) if n in need.loci]
    return order[-1] if order else None


__all__ = ["Need", "Selection", "everything", "select", "stage_reads", "stop_after", "whole_model_reason"]
