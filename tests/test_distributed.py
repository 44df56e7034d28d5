"""Data-parallel extraction under torchrun: real gloo process groups of CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_mllmprobe.distributed import shards
from pytest_mllmprobe.errors import ConfigError

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
RUN = ("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "tests.rank_faults")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _torchrun(where: Path, ranks: int, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "pytest", *RUN, *args]
    return subprocess.run(command, cwd=where, capture_output=True, text=True, env=_env(**env), timeout=600)


def _results(folder: Path) -> dict:
    doc = json.loads((folder / "results.json").read_text())
    for model in doc["models"].values():  # seconds differ from run to run
        model.pop("timings")
        model["random_init"].pop("cost_s")
        model["answers"]["invariance"].pop("cost_s")
    return doc


@pytest.mark.parametrize("n, batch_size, world", [
    (150, 8, 2), (150, 8, 3), (7, 8, 2), (9, 4, 4), (10, 8, 10), (16, 8, 2), (1, 1, 1), (33, 16, 5),
])
def test_shards_cover_the_images_in_order_in_whole_batches_where_possible(n: int, batch_size: int, world: int) -> None:
    parts = shards(n, batch_size, world)
    assert len(parts) == world and all(len(p) > 0 for p in parts)
    assert [i for p in parts for i in p] == list(range(n))
    if -(-n // batch_size) >= world:  # enough batches: every shard starts on a batch boundary
        assert all(p.start % batch_size == 0 for p in parts)
    sizes = [len(p) for p in parts[:-1]]
    assert max(sizes, default=0) - min(sizes, default=0) <= batch_size


def test_more_ranks_than_images_is_refused() -> None:
    with pytest.raises(ConfigError, match="torchrun started 5 ranks for 4 images"):
        shards(4, 8, 5)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The demo in one process and under ``torchrun --nproc-per-node 2``, one thread each."""
    where = tmp_path_factory.mktemp("ranks")
    (where / "record").mkdir()
    # the answer under a second option order and the random-init twin are gathered too
    extra = ("--mllm-model=demo", "--mllm-answer-orders=2", "--mllm-controls=random-init")
    one = subprocess.run(
        [sys.executable, "-m", "pytest", *RUN, *extra, "--mllm-report=one", "--junitxml=one.xml"],
        cwd=where, capture_output=True, text=True, env=_env(), timeout=600,
    )
    two = _torchrun(where, 2, *extra, "--mllm-report=two", "--junitxml=two.xml", RANK_RECORD=str(where / "record"))
    return where, one, two


def test_two_ranks_split_the_images_and_give_the_one_process_results(two_ranks) -> None:
    where, one, two = two_ranks
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]
    # each rank extracted its own half, in whole batches of 8: 10 batches and 9
    spans = {r: json.loads((where / "record" / f"rank{r}.json").read_text())["rows"] for r in (0, 1)}
    assert spans == {0: [0, 80], 1: [80, 150]}
    assert _results(where / "two") == _results(where / "one")
    model = _results(where / "two")["models"]["demo"]
    assert model["loci"]["connector"]["random_init"] and "order.1" in json.dumps(model["answers"])
    timings = json.loads((where / "two" / "results.json").read_text())["models"]["demo"]["timings"]
    assert timings["ranks"] == 2 and "gather_s" in timings


def test_only_rank_0_reports(two_ranks) -> None:
    where, _, two = two_ranks
    assert two.stdout.count("mllmprobe: feature health") == 1  # rank 1 prints nothing
    assert two.stdout.count("18 passed") == 1

    def cases(name: str) -> list[tuple[str, bool]]:
        root = ET.parse(where / name).getroot()
        return sorted((c.get("name"), c.find("failure") is None) for c in root.iter("testcase"))

    assert cases("two.xml") == cases("one.xml") and len(cases("two.xml")) == 18


def test_a_selection_is_extracted_alike_on_every_rank(tmp_path: Path) -> None:
    """``-k vision`` under torchrun: rank 0 sends the loci to extract; rank 1 pools the same."""
    done = _torchrun(tmp_path, 2, "--mllm-model=demo", "-k", "vision", RANK_RECORD=str(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert found[0]["loci"] == found[1]["loci"] == ["vision.0", "vision.1", "vision.2", "vision.3"]
    assert not found[0]["answer"] and not found[1]["answer"]
    assert found[1]["rows"] == [80, 150]
    assert "5 passed" in done.stdout  # 4 vision loci and the vision stage rule


def test_python_api_under_torchrun_returns_the_results_on_rank_0(tmp_path: Path) -> None:
    script = tmp_path / "api.py"
    script.write_text(
        "import json, os, sys\n"
        "from pytest_mllmprobe import run\n"
        "results = run('demo', bootstrap=0, permutations=0)\n"
        "out = {'none': True} if results is None else results.to_dict()\n"
        "for model in out.get('models', {}).values(): model.pop('timings')\n"
        "open(sys.argv[1] + os.environ['RANK'] + '.json', 'w').write(json.dumps(out, sort_keys=True))\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(script), str(tmp_path / "rank")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    from pytest_mllmprobe import run

    alone = run("demo", bootstrap=0, permutations=0).to_dict()
    for model in alone["models"].values():
        model.pop("timings")
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"none": True}
    assert json.loads((tmp_path / "rank0.json").read_text()) == json.loads(json.dumps(alone, sort_keys=True))


def test_bad_input_on_one_rank_is_a_usage_error_and_nothing_is_written(tmp_path: Path) -> None:
    done = _torchrun(tmp_path, 2, "--mllm-model=demo", "--mllm-report=report", "--mllm-cache-dir=cache",
                     RANK_FAULT="raise")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank 1 of 2 failed the extraction of 'demo': ConfigError: planted: image 80 of rank 1's shard" in out
    assert "mllmprobe usage error" in out  # rank 0 ended with exit code 4, not failing tests
    assert not (tmp_path / "report").exists()
    assert not list((tmp_path / "cache").glob("*.npz"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("dying", [1, 0])
def test_a_dying_rank_stops_the_others_with_a_clear_error_and_nothing_written(tmp_path: Path, dying: int) -> None:
    """Launched without torchrun (as SLURM's srun would: the environment names the group), two
    models: the first is evaluated, then a rank dies in the second one's extraction. The other
    rank stops on the broken collective with a clear message (a serving rank's on stderr); no
    report is written, though the first model's figures were complete, and no cache entry of the
    second model."""
    import shutil

    from pytest_mllmprobe.demo import DEMO_DATA, DEMO_MODEL

    # fresh file times: another model to the feature cache (a metadata-preserving copy shares demo's key)
    shutil.copytree(DEMO_MODEL, tmp_path / "other", copy_function=shutil.copy)
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", RANK_FAULT="exit",
                  RANK_FAULT_RANK=str(dying), RANK_FAULT_MODEL="other")
    command = [sys.executable, "-m", "pytest", *RUN, "--mllm-model=demo", "--mllm-model=other",
               f"--mllm-data={DEMO_DATA}", "--mllm-report=report", "--mllm-cache-dir=cache"]
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(**common, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    outs = [rank.communicate(timeout=600) for rank in ranks]
    survivor = 1 - dying
    out, err = outs[survivor]
    assert ranks[dying].returncode == 9, outs
    assert ranks[survivor].returncode == 1, out + err
    message = "torch.distributed: the vote after the extraction of 'other' failed: another rank died"
    if survivor == 0:
        assert message in out and "18 passed" in out  # the first model's tests ran
        assert "wrote no baseline or report: a torch.distributed rank was lost during the run" in out
    else:  # a serving rank's terminal is silent: its error goes to stderr
        assert f"ERROR: mllmprobe rank 1: {message}" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "report").exists()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the first model's, written by rank 0 before


def test_more_ranks_than_images_under_torchrun(tmp_path: Path) -> None:
    from PIL import Image

    from pytest_mllmprobe.demo import DEMO_DATA

    for name in ("normal", "benign"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for path in sorted((DEMO_DATA / name).glob("*.png"))[:2]:
            Image.open(path).save(tmp_path / "data" / name / path.name)
    done = _torchrun(tmp_path, 5, "--mllm-model=demo", "--mllm-data=data")
    assert done.returncode != 0
    assert "torchrun started 5 ranks for 4 images: every rank needs at least one image; start at most 4" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--mllm-dist-backend=nccl", "--mllm-device=cpu"], "--mllm-dist-backend nccl needs a GPU per rank"),
    (["-p", "xdist", "-n", "1"], "torchrun and pytest-xdist (-n) both start processes"),
])
def test_bad_distributed_settings_are_usage_errors(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], message: str) -> None:
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest("--mllm-model=demo", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_out_of_memory_at_batch_size_1_under_torchrun_does_not_advise_a_refused_option(monkeypatch) -> None:
    # --mllm-device-map is refused under torchrun: the advice there is one process spread over the GPUs
    from pytest_mllmprobe import distributed
    from pytest_mllmprobe.extract import out_of_memory_advice

    alone = out_of_memory_advice()
    assert "--mllm-device-map auto" in alone and "rank" not in alone
    monkeypatch.setattr(distributed, "current", lambda: distributed.Group(1, 2, 1, "nccl"))
    ranked = out_of_memory_advice()
    assert ranked.startswith("out of memory with batch size 1 on rank 1 of 2")
    assert "without torchrun" in ranked
