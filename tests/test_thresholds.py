"""Threshold files: shipped default, merging, model and locus globs, and every error message."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pytest_mllmprobe import thresholds as th

DEFAULT = th.DEFAULT_NAME


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- shipped files


def test_default_loads_with_documented_values():
    rules = th.load_thresholds()
    assert rules.files == (DEFAULT,)
    t = rules.for_model("demo", "demo")
    assert t.metric == "accuracy"
    assert t.locus == th.LocusRule(0.10, None, f"{DEFAULT}: locus", 0.05)
    assert t.loci == ()
    assert t.stages == {
        "vision": {"min_fhs": None, "min_end_above_chance": 0.20, "min_dip_ratio": 0.75, "min_selectivity": None},
        "connector": {"min_keep": 0.90, "min_selectivity": None},
        "llm": {"min_keep": 0.90, "min_fhs_ratio": 0.80, "min_dip_ratio": 0.80, "min_selectivity": None},
        "answer": {"min_keep": 0.80, "min_lens_keep": 0.80, "min_consistency": 0.80},
    }
    assert t.stage_source("llm", "min_fhs_ratio") == f"{DEFAULT}: stages.llm.min_fhs_ratio"
    assert t.metric_source == f"{DEFAULT}: metric"
    assert t.model_sections == ()


def test_default_file_is_the_package_resource_and_sets_every_key():
    import yaml

    data = yaml.safe_load(th.default_threshold_file().read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert set(data["stages"]) == set(th.STAGES)
    for stage, keys in th.STAGE_KEYS.items():
        assert set(data["stages"][stage]) == set(keys)
    assert set(data["locus"]) == set(th.LOCUS_KEYS)


def test_empty_paths_mean_default_only():
    assert th.load_thresholds([]).files == (DEFAULT,)
    assert th.load_thresholds(None).files == (DEFAULT,)


def test_paper_strict_preset_is_stricter_than_default():
    assert "paper-strict" in th.available_presets()
    default = th.load_thresholds().for_model("m", "m")
    strict = th.load_thresholds(["paper-strict"]).for_model("m", "m")
    assert strict.files == (DEFAULT, "thresholds/paper-strict.yaml")
    assert strict.metric == "balanced_accuracy"
    assert strict.locus.min_above_chance > default.locus.min_above_chance
    for stage, keys in th.STAGE_KEYS.items():
        for key in keys:
            d, s = default.stage(stage, key), strict.stage(stage, key)
            assert (d is None and s is None) or s > d, (stage, key)


def test_thresholds_module_imports_nothing_heavy():
    code = (
        "import sys, pytest_mllmprobe.thresholds as t; t.load_thresholds().for_model('a', 'b');"
        "bad = [m for m in ('torch', 'transformers', 'sklearn', 'pytest', 'numpy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- merging


def test_user_file_changes_only_its_keys_and_later_file_wins(tmp_path):
    a = write(tmp_path, "a.yaml", """
        stages:
          connector: {min_keep: 0.5}
          llm: {min_keep: 0.6}
    """)
    b = write(tmp_path, "b.yaml", """
        version: 1
        locus: {floor: 0.3}
        stages:
          llm: {min_keep: 0.7}
    """)
    rules = th.load_thresholds([a, str(b)])
    assert rules.files == (DEFAULT, str(a), str(b))
    t = rules.for_model("demo", "demo")
    assert t.stage("connector", "min_keep") == 0.5
    assert t.stage("llm", "min_keep") == 0.7
    assert t.stage("llm", "min_fhs_ratio") == 0.80  # untouched default
    assert t.stage_source("llm", "min_keep") == f"{b}: stages.llm.min_keep"
    assert t.stage_source("connector", "min_keep") == f"{a}: stages.connector.min_keep"
    assert t.locus.min_above_chance == 0.10 and t.locus.floor == 0.3
    assert t.locus.source == (f"min_above_chance from {DEFAULT}: locus; floor from {b}: locus; "
                              f"min_selectivity from {DEFAULT}: locus")
    # the other order gives the other answer
    assert th.load_thresholds([b, a]).for_model("demo", "demo").stage("llm", "min_keep") == 0.6


def test_null_disables_a_rule_and_ints_are_floats(tmp_path):
    f = write(tmp_path, "x.yaml", """
        locus: {min_above_chance: null, floor: 1}
        stages: {answer: {min_keep: null}, vision: {min_fhs: 2}}
    """)
    t = th.load_thresholds([f]).for_model("demo", "demo")
    assert t.locus.min_above_chance is None
    assert t.locus.floor == 1.0 and isinstance(t.locus.floor, float)
    assert t.stage("answer", "min_keep") is None
    assert t.stage("vision", "min_fhs") == 2.0  # FHS may exceed 1


def test_single_path_and_empty_file_are_accepted(tmp_path):
    f = write(tmp_path, "empty.yaml", "# nothing yet\n")
    t = th.load_thresholds(f).for_model("demo", "demo")
    assert t.files == (DEFAULT, str(f))
    assert t.stages == th.load_thresholds().for_model("demo", "demo").stages


def test_folder_loads_yaml_files_sorted_by_name(tmp_path):
    folder = tmp_path / "gates"
    write(folder, "20-late.yml", "stages: {connector: {min_keep: 0.2}}\n")
    write(folder, "10-early.yaml", "stages: {connector: {min_keep: 0.1}, answer: {min_keep: 0.1}}\n")
    write(folder, ".hidden.yaml", "stages: {connector: {min_keep: 0.9999}}\n")
    write(folder, "notes.txt", "not: yaml: at all")
    (folder / "sub.yaml").mkdir()
    rules = th.load_thresholds([folder])
    assert rules.files == (DEFAULT, str(folder / "10-early.yaml"), str(folder / "20-late.yml"))
    t = rules.for_model("demo", "demo")
    assert t.stage("connector", "min_keep") == 0.2
    assert t.stage("answer", "min_keep") == 0.1


def test_to_dict_is_json(tmp_path):
    f = write(tmp_path, "x.yaml", 'loci: {"llm.*": {floor: 0.4}}\nmodels: {"d*": {metric: balanced_accuracy}}\n')
    d = th.load_thresholds([f]).for_model("demo", "demo").to_dict()
    again = json.loads(json.dumps(d))
    assert again["metric"] == "balanced_accuracy"
    assert again["loci"] == [{"glob": "llm.*", "floor": 0.4, "source": f'{f}: loci["llm.*"]'}]
    assert again["model_sections"] == [f'{f}: models["d*"]']
    assert again["stages"]["connector"]["min_keep"] == 0.9


# --------------------------------------------------------------------------- model sections


MODELS = """
    stages: {connector: {min_keep: 0.5}}
    models:
      "my-llava*":
        metric: balanced_accuracy
        locus: {min_above_chance: 0.2}
        stages: {connector: {min_keep: 0.95}}
      "*-ft":
        stages: {connector: {min_keep: 0.99}, answer: {min_keep: 0.9}}
      "org/*":
        stages: {llm: {min_keep: 0.3}}
"""


def test_model_glob_matches_label(tmp_path):
    rules = th.load_thresholds([write(tmp_path, "m.yaml", MODELS)])
    t = rules.for_model("my-llava", "/somewhere/else")
    assert t.metric == "balanced_accuracy"
    assert t.locus.min_above_chance == 0.2
    assert t.stage("connector", "min_keep") == 0.95
    assert t.model_sections == (f'{tmp_path / "m.yaml"}: models["my-llava*"]',)


def test_model_glob_matches_path_hub_id_and_folder_name(tmp_path):
    rules = th.load_thresholds([write(tmp_path, "m.yaml", MODELS)])
    assert rules.for_model("x", "/ckpt/my-llava-7b/").metric == "balanced_accuracy"  # folder name
    assert rules.for_model("x", "org/model").stage("llm", "min_keep") == 0.3  # hub id
    assert rules.for_model("x", tmp_path / "my-llava").metric == "balanced_accuracy"  # PathLike
    plain = rules.for_model("demo", "demo")
    assert plain.metric == "accuracy" and plain.stage("connector", "min_keep") == 0.5
    assert plain.model_sections == ()


def test_every_matching_model_section_applies_in_file_order(tmp_path):
    rules = th.load_thresholds([write(tmp_path, "m.yaml", MODELS)])
    t = rules.for_model("my-llava-ft", "my-llava-ft")
    assert t.metric == "balanced_accuracy"  # from the first section
    assert t.stage("connector", "min_keep") == 0.99  # the second section wins
    assert t.stage("answer", "min_keep") == 0.9
    assert len(t.model_sections) == 2
    assert rules.matching_sections("my-llava-ft") == t.model_sections
    assert [glob for glob, _ in rules.model_globs()] == ["my-llava*", "*-ft", "org/*"]


def test_model_section_beats_a_later_files_top_level(tmp_path):
    first = write(tmp_path, "1.yaml", 'models: {"demo": {stages: {llm: {min_keep: 0.4}}}}\n')
    later = write(tmp_path, "2.yaml", "stages: {llm: {min_keep: 0.6}}\n")
    t = th.load_thresholds([first, later]).for_model("demo", "demo")
    assert t.stage("llm", "min_keep") == 0.4
    assert t.stage_source("llm", "min_keep") == f'{first}: models["demo"].stages.llm.min_keep'


# --------------------------------------------------------------------------- loci


LOCI = """
    locus: {min_above_chance: 0.1, floor: null}
    loci:
      "vision.*": {min_above_chance: 0.0}
      "vision.1*": {floor: 0.6}
      "vision.12": {min_above_chance: 0.5}
    models:
      "demo":
        loci: {"*.12": {floor: 0.7}}
"""


def test_for_locus_applies_every_matching_glob_in_order(tmp_path):
    f = write(tmp_path, "l.yaml", LOCI)
    t = th.load_thresholds([f]).for_model("other", "other")
    assert t.for_locus("llm.3.image") == th.LocusRule(
        0.1, None, f"min_above_chance from {f}: locus; floor from {f}: locus; min_selectivity from {DEFAULT}: locus",
        0.05)
    assert t.for_locus("vision.3") == th.LocusRule(0.0, None, (
        f'min_above_chance from {f}: loci["vision.*"]; floor from {f}: locus; '
        f'min_selectivity from {DEFAULT}: locus'), 0.05)
    r = t.for_locus("vision.12")
    assert (r.min_above_chance, r.floor) == (0.5, 0.6)
    assert r.source == (f'min_above_chance from {f}: loci["vision.12"]; floor from {f}: loci["vision.1*"]; '
                        f'min_selectivity from {DEFAULT}: locus')
    assert t.for_locus("vision.2").floor is None
    assert t.for_locus("Vision.3").min_above_chance == 0.1  # globs are case-sensitive


def test_model_loci_come_after_file_loci(tmp_path):
    f = write(tmp_path, "l.yaml", LOCI)
    t = th.load_thresholds([f]).for_model("demo", "demo")
    assert [g for g, _, _ in t.loci] == ["vision.*", "vision.1*", "vision.12", "*.12"]
    r = t.for_locus("vision.12")
    assert (r.min_above_chance, r.floor) == (0.5, 0.7)
    assert t.for_locus("llm.12.image").floor is None  # "*.12" needs the name to end in .12


def test_loci_from_later_files_win(tmp_path):
    a = write(tmp_path, "a.yaml", 'loci: {"llm.*": {floor: 0.2}}\n')
    b = write(tmp_path, "b.yaml", 'loci: {"llm.*.last": {floor: 0.3}}\n')
    t = th.load_thresholds([a, b]).for_model("demo", "demo")
    assert t.for_locus("llm.0.last").floor == 0.3
    assert t.for_locus("llm.0.image").floor == 0.2
    t = th.load_thresholds([b, a]).for_model("demo", "demo")
    assert t.for_locus("llm.0.last").floor == 0.2


# --------------------------------------------------------------------------- metric override


def test_metric_override_beats_files_and_model_sections(tmp_path):
    f = write(tmp_path, "m.yaml", MODELS)
    rules = th.load_thresholds([f], metric="accuracy")
    t = rules.for_model("my-llava", "my-llava")
    assert t.metric == "accuracy"
    assert t.metric_source == f"command line ({th.METRIC_OPTION})"
    assert t.stage("connector", "min_keep") == 0.95  # the rest of the section still applies
    assert th.load_thresholds(metric="balanced_accuracy").for_model("d", "d").metric == "balanced_accuracy"


def test_bad_metric_override():
    with pytest.raises(th.ConfigError) as err:
        th.load_thresholds(metric="balanced-accuracy")
    msg = str(err.value)
    assert th.METRIC_OPTION in msg and "did you mean 'balanced_accuracy'" in msg


def test_unknown_stage_or_key_in_lookup():
    t = th.load_thresholds().for_model("d", "d")
    with pytest.raises(th.ConfigError, match="did you mean 'connector'"):
        t.stage("conector", "min_keep")
    with pytest.raises(th.ConfigError, match="stages.llm.min_kep.*did you mean 'min_keep'"):
        t.stage("llm", "min_kep")


# --------------------------------------------------------------------------- errors

ERRORS = {
    "yaml-syntax": ("stages:\n  connector: {min_keep: 0.9\n  llm: x\n", ["YAML syntax error", "line "]),
    "yaml-alias": ("loci:\n  *.image: {floor: 0.5}\n", ["YAML syntax error", "line 2", 'quote glob keys', '"*.image"']),
    "top-level-list": ("- 1\n- 2\n", ["top level must be a mapping", "got a list", "version, metric"]),
    "unknown-top": ("metrik: accuracy\n", ["unknown key 'metrik'", "did you mean 'metric'", "valid keys: version"]),
    "unknown-stage": ("stages:\n  conector: {min_keep: 0.9}\n", [
        "unknown key 'stages.conector' (did you mean 'connector'?); valid keys: vision, connector, llm, answer"]),
    "unknown-stage-key": ("stages: {llm: {min_kep: 0.9}}\n", [
        "unknown key 'stages.llm.min_kep'", "did you mean 'min_keep'", "min_fhs_ratio"]),
    "unknown-locus-key": ("locus: {min_above_chanse: 0.1}\n", [
        "unknown key 'locus.min_above_chanse'", "did you mean 'min_above_chance'"]),
    "unknown-loci-key": ('loci: {"vision.0": {flor: 0.1}}\n', [
        "unknown key 'loci[\"vision.0\"].flor'", "did you mean 'floor'"]),
    "unknown-model-key": ('models: {"m*": {stage: {}}}\n', [
        "unknown key 'models[\"m*\"].stage'", "did you mean 'stages'"]),
    "version-in-model": ('models: {"m*": {version: 1}}\n', [
        "unknown key 'models[\"m*\"].version'", "only at the top level"]),
    "unknown-model-stage": ('models: {"m*": {stages: {visoin: {min_fhs: 1}}}}\n', [
        "unknown key 'models[\"m*\"].stages.visoin'", "did you mean 'vision'"]),
    "string-number": ('stages: {connector: {min_keep: "0.9"}}\n', [
        "stages.connector.min_keep", "'0.9' (a string)", "without quotes", th.RANGE_HINT]),
    "e-notation": ("locus: {floor: 1e-3}\n", ["locus.floor", "1.0e-3"]),
    "bool-number": ("stages: {answer: {min_keep: yes}}\n", ["stages.answer.min_keep", "true (a boolean)", th.RANGE_HINT]),
    "out-of-range": ("stages: {connector: {min_keep: 1.5}}\n", ["stages.connector.min_keep", "got 1.5", "[0, 1]"]),
    "percent": ("stages: {llm: {min_fhs_ratio: 80}}\n", ["stages.llm.min_fhs_ratio", "got 80", "80% is 0.8"]),
    "negative": ("locus: {min_above_chance: -0.1}\n", ["locus.min_above_chance", "got -0.1", "[0, 1]"]),
    "negative-fhs": ("stages: {vision: {min_fhs: -1}}\n", ["stages.vision.min_fhs", "got -1", th.SCORE_HINT]),
    "nan": ("locus: {floor: .nan}\n", ["locus.floor", "got nan"]),
    "inf-fhs": ("stages: {vision: {min_fhs: .inf}}\n", ["stages.vision.min_fhs", "got inf"]),
    "list-number": ("locus: {floor: [0.5]}\n", ["locus.floor", "got a list"]),
    "bad-version": ("version: 2\n", ["version must be 1", "got 2"]),
    "bool-version": ("version: true\n", ["version must be 1", "true (a boolean)"]),
    "bad-metric": ("metric: acuracy\n", ["metric must be one of accuracy, balanced_accuracy",
                                         "'acuracy' (a string)", "did you mean 'accuracy'"]),
    "null-metric": ("metric:\n", ["metric must be one of", "got null"]),
    "bad-model-metric": ('models: {"m": {metric: f1}}\n', ['models["m"].metric must be one of']),
    "null-stage": ("stages:\n  connector:\n", ["stages.connector must be a mapping", "got null", "write {}"]),
    "stages-list": ("stages: [vision]\n", ["stages must be a mapping", "got a list"]),
    "model-null": ('models: {"m": null}\n', ['models["m"] must be a mapping', "got null"]),
    "bool-key": ("loci: {yes: {floor: 0.1}}\n", ["key true (a boolean) in loci is not a string", "quote it"]),
    "duplicate-key": ("stages:\n  llm: {min_keep: 0.5}\nstages:\n  answer: {min_keep: 0.5}\n", [
        "duplicate key 'stages' at line 3 (first at line 1)", "merge the two entries"]),
    "loci-typo": ('loci: {"vison.0": {floor: 0.1}}\n', [
        'loci["vison.0"] can match no locus', "did you mean 'vision'"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_file_errors_name_file_key_and_hint(tmp_path, case):
    text, expected = ERRORS[case]
    f = write(tmp_path, f"{case}.yaml", text)
    with pytest.raises(th.ConfigError) as err:
        th.load_thresholds([f]).for_model("m", "m")
    msg = str(err.value)
    assert msg.startswith(f"{f}: ")
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_yaml_error_reports_line(tmp_path):
    f = write(tmp_path, "x.yaml", "version: 1\nstages:\n  llm: {min_keep: 0.9}\n bad: 1\n")
    with pytest.raises(th.ConfigError, match=r"x\.yaml: YAML syntax error at line 4"):
        th.load_thresholds([f])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(th.ConfigError) as err:
        th.load_thresholds([missing])
    msg = str(err.value)
    assert msg.startswith(f"{missing}: threshold file not found")
    assert "paper-strict" in msg


def test_misspelled_preset():
    with pytest.raises(th.ConfigError, match="did you mean 'paper-strict'"):
        th.load_thresholds(["paper-strikt"])


def test_folder_without_yaml(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(th.ConfigError, match="has no \\*.yaml or \\*.yml files"):
        th.load_thresholds([tmp_path])


def test_error_in_second_file_names_that_file(tmp_path):
    good = write(tmp_path, "good.yaml", "stages: {llm: {min_keep: 0.5}}\n")
    bad = write(tmp_path, "bad.yaml", "stages: {llm: {min_keep: 5}}\n")
    with pytest.raises(th.ConfigError) as err:
        th.load_thresholds([good, bad])
    assert str(err.value).startswith(f"{bad}: stages.llm.min_keep")


def test_not_utf8(tmp_path):
    f = tmp_path / "latin.yaml"
    f.write_bytes("metric: \xe9\n".encode("latin-1"))
    with pytest.raises(th.ConfigError, match="latin.yaml: not UTF-8"):
        th.load_thresholds([f])
