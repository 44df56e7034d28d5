"""The plugin's vocabulary: every ``--mllm-*`` option with its ini key, the marker, JUnit flavours.

Imported by :mod:`.plugin` (which registers the options) and :mod:`.items` (the generated
tests); it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

GROUP = "mllmprobe"
MARKER = "featureprobe"
XUNIT_WITH_TESTCASE_PROPERTIES = ("xunit1", "legacy")


@dataclass(frozen=True)
class Option:
    flag: str
    dest: str
    default: Any
    help: str
    kind: str = "string"  # string | int | float | bool | list
    choices: tuple[str, ...] | None = None

    @property
    def ini(self) -> str:
        return self.dest


OPTIONS = (
    Option("--mllm-model", "mllm_model", [], "model to probe: 'demo' (bundled), a local folder saved with save_pretrained, or a hub id; repeat for several models (default: none, the plugin stays off)", "list"),
    Option("--mllm-data", "mllm_data", None, "data: an image or DICOM folder DATA/<class>/<image>, a .csv/.jsonl manifest, a MedMNIST-style .npz, a dataset .yaml or module:function (default: the bundled demo data, only with --mllm-model demo)"),
    Option("--mllm-thresholds", "mllm_thresholds", [], "threshold YAML file or folder, merged over the shipped thresholds/default.yaml; repeatable (default: the shipped default only)", "list"),
    Option("--mllm-device", "mllm_device", "auto", "device for the forward pass: auto, cpu, cuda or cuda:N (default: auto = first GPU if any, else cpu)"),
    Option("--mllm-device-map", "mllm_device_map", None, "spread a model too large for one GPU over every GPU (and the CPU) with transformers' device_map: auto, balanced, balanced_low_0 or sequential; needs accelerate (pip install 'pytest-mllmprobe[gpu]') (default: off, the whole model on --mllm-device)", choices=("auto", "balanced", "balanced_low_0", "sequential")),
    Option("--mllm-dtype", "mllm_dtype", "auto", "weights dtype (default: auto = float32 on cpu, bfloat16 on a GPU)", choices=("auto", "float32", "bfloat16", "float16")),
    Option("--mllm-batch-size", "mllm_batch_size", 8, "images per forward pass (default: 8)", "int"),
    Option("--mllm-max-samples", "mllm_max_samples", None, "use a class-stratified, seeded subset of this many images (default: every image)", "int"),
    Option("--mllm-seed", "mllm_seed", 0, "seed of the train/test split and of subsampling (default: 0)", "int"),
    Option("--mllm-probe-seed", "mllm_probe_seed", 0, "seed of MLP probe initialisation and shuffling; does not change the split (default: 0)", "int"),
    Option("--mllm-probe", "mllm_probe", "linear", "probe: linear (softmax regression) or mlp (the paper's 2-layer MLP) (default: linear)", choices=("linear", "mlp")),
    Option("--mllm-test-size", "mllm_test_size", 0.3, "fraction of images held out to score probes and the answer (default: 0.3)", "float"),
    Option("--mllm-metric", "mllm_metric", None, "metric every rule uses, overriding the threshold files: accuracy, balanced_accuracy, macro_f1 or auroc (default: from the threshold files, shipped: accuracy)", choices=("accuracy", "balanced_accuracy", "macro_f1", "auroc")),
    Option("--mllm-stages", "mllm_stages", None, "override stage detection with module paths: vision=PATH,connector=PATH,llm=PATH (default: detected)"),
    Option("--mllm-trust-remote-code", "mllm_trust_remote_code", False, "allow models that run their own code from the model folder or hub (default: off)", "bool"),
    Option("--mllm-baseline", "mllm_baseline", None, "compare every test with this baseline JSON; a significant regression fails (default: no comparison)"),
    Option("--mllm-save-baseline", "mllm_save_baseline", None, "write this run's results as a baseline JSON, merged into an existing file (default: none)"),
    Option("--mllm-update-baseline", "mllm_update_baseline", False, "rewrite the --mllm-baseline file with this run instead of comparing (default: off)", "bool"),
    Option("--mllm-compare-to", "mllm_compare_to", None, "compare every other model of this run with the model of this label, on the same data and split; 'base' compares every PEFT adapter with its own base, added to the run (default: none)"),
    Option("--mllm-base-model", "mllm_base_model", None, "base model (folder or cached hub id) of every PEFT adapter given with --mllm-model, instead of base_model_name_or_path in its adapter_config.json (default: the adapter's own)"),
    Option("--mllm-answer", "mllm_answer", "likelihood", "how P_final is read: likelihood (closed-set scoring of the class names) or generate (greedy generation, first class name in the text; also reports the likelihood one and the parse-failure rate) (default: likelihood)", choices=("likelihood", "generate")),
    Option("--mllm-folds", "mllm_folds", None, "folds of the evaluation: every image is tested once, in one of k grouped, stratified folds; 1 = one seeded split of --mllm-test-size (default: 5, fewer when a class is too small, or the data's own split when it has one)", "int"),
    Option("--mllm-bootstrap", "mllm_bootstrap", 1000, "bootstrap resamples of the confidence intervals of every locus metric, stage score and ratio (patients resampled when the data has them); 0 turns intervals off (default: 1000)", "int"),
    Option("--mllm-permutations", "mllm_permutations", None, "control task: probes fitted on this many permutations of the training labels, for each locus's selectivity and permutation p-value; 0 turns it off (default: 9 with the linear probe, 0 with the MLP, whose every permutation is one more training per fold)", "int"),
    Option("--mllm-controls", "mllm_controls", [], "opt-in controls: random-init (the same architecture with re-initialised weights, extracted once more, drawn as a floor) (default: none)", "list", choices=("random-init",)),
    Option("--mllm-answer-orders", "mllm_answer_orders", 1, "score the model's own answer under this many cyclic rotations of the option order in the prompt (one more forward per rotation; the probes stay on the prompt's own order) and report per-rotation accuracy, consistency and CircularEval accuracy; 1 = the prompt's own order only (default: 1)", "int"),
    Option("--mllm-power", "mllm_power", None, "print how many test images (patients) a drop of this size needs to be detected, for the data at hand, and exit without loading a model, e.g. 0.02 (default: off)", "float"),
    Option("--mllm-skip-bad-images", "mllm_skip_bad_images", False, "skip unreadable images and list them in the summary instead of stopping (default: off)", "bool"),
    Option("--mllm-cache-dir", "mllm_cache_dir", None, "feature cache folder, shared by xdist workers (a re-run that changes only thresholds or probe settings loads no model) (default: .pytest_cache/d/mllmprobe when pytest's cache is on, else off)"),
    Option("--mllm-no-cache", "mllm_no_cache", False, "do not read or write the feature cache (default: off)", "bool"),
    Option("--mllm-dist-backend", "mllm_dist_backend", "auto", "torch.distributed backend when torchrun starts several ranks (each extracts its share of the images; rank 0 fits the probes and reports): auto = nccl on GPUs, gloo on the CPU (default: auto)", choices=("auto", "gloo", "nccl")),
    Option("--mllm-report", "mllm_report", None, "write results.json, plots and index.html into this folder (default: none)"),
)


def junit_family(config: pytest.Config) -> str:
    try:
        return str(config.getini("junit_family"))
    except ValueError:
        return "xunit2"
