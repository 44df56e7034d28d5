"""What people read on the terminal: progress lines stand apart from pytest's, node ids are stable.

A model is evaluated in the setup of its first test, after pytest has written that test's
location; the extraction progress must not split that line (``mllm/demo`` printed twice, a lone
``.`` between). Node ids name no file, so they print as ``mllm/<model>::<test>`` from any folder,
never as ``../mllm/...``.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_mllmprobe.plugin import ExtractionProgress

RUN = ("-p", "no:cacheprovider", "-p", "no:randomly", "--mllm-max-samples=60")
#: the demo's first vision block cannot classify every image: one failing test, for the summary
STRICT = 'version: 1\nloci:\n  "vision.0": {floor: 1.0}\n'
PROGRESS = "mllmprobe: demo: extracted "
#: a line of result letters with no location before it
LONE_LETTERS = re.compile(r"^[.FEsxX]+\s*(\[\s*\d+%\])?$")


@pytest.fixture
def subfolder(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project (its ini file and a strict threshold file) and pytest started in a folder below it."""
    pytester.makeini("[pytest]\n")
    (pytester.path / "strict.yaml").write_text(STRICT, encoding="utf-8")
    sub = pytester.mkdir("sub")
    monkeypatch.chdir(sub)
    return sub


def _progress_lines(lines: list[str]) -> list[int]:
    found = [n for n, line in enumerate(lines) if "extracted" in line]
    assert found, "no progress line:\n" + "\n".join(lines)
    for n in found:  # each on a line of its own, never glued to pytest's output
        assert lines[n].startswith(PROGRESS), lines[n]
    return found


def test_progress_comes_before_the_model_line_and_ids_start_with_mllm(
    pytester: pytest.Pytester, subfolder: Path
) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-thresholds=../strict.yaml", *RUN)
    lines = result.outlines
    text = "\n".join(lines)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text
    assert "rootdir: " + str(pytester.path) in text  # started below the rootdir
    assert "../mllm" not in text and "mllm/mllm" not in text
    progress = _progress_lines(lines)
    model_lines = [n for n, line in enumerate(lines) if line.startswith("mllm/demo ")]
    assert len(model_lines) == 1, text  # the location once, not before and after the progress
    assert max(progress) < model_lines[0], text  # progress first, then the model's letters
    assert re.match(r"^mllm/demo [.F]{18}\s+\[100%\]$", lines[model_lines[0]]), lines[model_lines[0]]
    assert not [line for line in lines if LONE_LETTERS.match(line)], text
    assert any(line.startswith("FAILED mllm/demo::vision.0 - ") for line in lines), text


def test_verbose_ids_are_written_once_with_their_outcome(pytester: pytest.Pytester, subfolder: Path) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=demo", "-v", *RUN)
    lines = result.outlines
    text = "\n".join(lines)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), text  # 60 images: a rule may fail
    assert "../mllm" not in text
    progress = _progress_lines(lines)
    ids = [n for n, line in enumerate(lines) if line.startswith("mllm/demo::")]
    assert len(ids) == 18, text  # one line per test: no id left hanging above the progress
    assert all(re.match(r"^mllm/demo::\S+ (PASSED|FAILED)\s+\[\s*\d+%\]$", lines[n]) for n in ids), text
    assert max(progress) < ids[0], text


# -- on a terminal: one line rewritten in place ------------------------------------------------
class _Terminal:
    """The parts of pytest's terminal reporter the progress uses, writing to a string."""

    def __init__(self, rootpath: Path, tty: bool) -> None:
        self.out = ""
        self.tty = tty
        self.currentfspath: Any = None
        self.startpath = rootpath

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str, **markup: Any) -> None:
        self.out += text

    def rewrite(self, line: str, **markup: Any) -> None:
        self.out += "\r" + line

    def ensure_newline(self) -> None:
        if self.currentfspath:
            self.out += "\n"
            self.currentfspath = None

    def write_line(self, line: str, **markup: Any) -> None:
        self.ensure_newline()
        self.out += line + "\n"


def _progress(terminal: _Terminal, rootpath: Path) -> ExtractionProgress:
    plugins = {"terminalreporter": terminal}
    config = SimpleNamespace(
        rootpath=rootpath,
        get_verbosity=lambda *_: 0,
        pluginmanager=SimpleNamespace(get_plugin=plugins.get, hasplugin=lambda name: name in plugins),
    )
    return ExtractionProgress(config)  # type: ignore[arg-type]


@pytest.mark.parametrize("tty", [True, False])
def test_progress_that_interrupts_a_test_file_line_writes_its_location_again(tmp_path: Path, tty: bool) -> None:
    """A test of yours that asks for ``mllm_results`` starts the evaluation mid-line."""
    terminal = _Terminal(tmp_path, tty)
    terminal.out = "test_mine.py ."
    terminal.currentfspath = tmp_path / "test_mine.py"
    progress = _progress(terminal, tmp_path)
    for done in (8, 16, 24, 32):
        progress("demo", done, 32)
    lines = terminal.out.split("\n")
    assert lines[0] == "test_mine.py ."
    assert lines[-1] == "test_mine.py "  # the next letter follows its location, not a lone "."
    assert terminal.currentfspath == tmp_path / "test_mine.py"
    shown = [part for line in lines[1:-1] for part in line.split("\r") if part]
    assert shown and all(part.startswith(PROGRESS) for part in shown)
    assert shown[-1].startswith(f"{PROGRESS}32/32 images")
    # the first call comes after the first batch: no rate yet (not 8 images in no time at all)
    assert shown[0] == f"{PROGRESS}8/32 images"
