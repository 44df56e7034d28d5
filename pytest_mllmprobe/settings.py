"""Run settings: one frozen dataclass, validated once, built from options, ini keys or Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

DEVICE_HINT = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
PROBES = ("linear", "mlp")
ANSWER_MODES = ("likelihood", "generate")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
#: Folds of the default evaluation: every image is tested once (unless the data has its own split).
DEFAULT_FOLDS = 5
#: Bootstrap resamples of the default 95% intervals (cheap: no probe is refitted).
DEFAULT_BOOTSTRAP = 1000
#: Label permutations of the default control task per locus (p-values down to 0.1; each one costs about one more probe fit).
DEFAULT_PERMUTATIONS = 9
#: Opt-in controls (``--mllm-controls``).
CONTROLS = ("random-init",)
DIST_BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run measures.

    ``models`` are ``demo``, local folders or hub ids; ``data`` an ImageFolder (``None`` uses
    the bundled demo data, allowed only when every model is ``demo``).
    """

    models: tuple[str, ...] = ()
    data: str | None = None
    thresholds: tuple[str, ...] = ()
    device: str = "auto"
    device_map: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    max_samples: int | None = None
    seed: int = 0
    probe_seed: int = 0
    probe: str = "linear"
    test_size: float = 0.3
    trust_remote_code: bool = False
    metric: str | None = None
    stages: dict[str, str] = field(default_factory=dict)
    baseline: str | None = None
    save_baseline: str | None = None
    update_baseline: bool = False
    compare_to: str | None = None
    #: the base of every PEFT adapter among ``models``, replacing ``base_model_name_or_path``
    base_model: str | None = None
    folds: int | None = None
    answer: str = "likelihood"
    cache_dir: str | None = None
    skip_bad_images: bool = False
    bootstrap: int = DEFAULT_BOOTSTRAP
    #: label permutations of the control task; ``None``: DEFAULT_PERMUTATIONS for the linear
    #: probe, none for the MLP (each permutation is one more MLP training per fold)
    permutations: int | None = None
    controls: tuple[str, ...] = ()
    #: cyclic rotations of the option order the answer is also scored under (1: the prompt's own only)
    answer_orders: int = 1
    #: torch.distributed backend of the ranks torchrun starts: auto (NCCL on GPUs, gloo on the CPU), gloo or nccl
    dist_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--mllm-batch-size {self.batch_size} must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--mllm-max-samples {self.max_samples} must be at least 1 (omit it to use every image)")
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"--mllm-test-size {self.test_size} must be between 0 and 1 (exclusive), e.g. 0.3")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"--mllm-device-map {self.device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--mllm-dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.probe not in PROBES:
            raise ConfigError(f"--mllm-probe {self.probe!r} is not one of {', '.join(PROBES)}")
        if self.metric is not None and self.metric not in METRICS:
            raise ConfigError(f"--mllm-metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.answer not in ANSWER_MODES:
            raise ConfigError(f"--mllm-answer {self.answer!r} is not one of {', '.join(ANSWER_MODES)}")
        if self.folds is not None and self.folds < 1:
            raise ConfigError(
                f"--mllm-folds {self.folds} must be 1 (one train/test split) or at least 2 (k-fold), "
                f"or left out for the default ({DEFAULT_FOLDS} folds, or the data's own split)"
            )
        if self.bootstrap < 0:
            raise ConfigError(f"--mllm-bootstrap {self.bootstrap} must be 0 (no intervals) or a number of resamples, e.g. 1000")
        if self.permutations is not None and self.permutations < 0:
            raise ConfigError(f"--mllm-permutations {self.permutations} must be 0 (no control task) or a number, e.g. 19")
        if self.answer_orders < 1:
            raise ConfigError(
                f"--mllm-answer-orders {self.answer_orders} must be at least 1 (1: the prompt's own option "
                "order only; K: K cyclic rotations of it, one more forward per rotation)"
            )
        if self.dist_backend not in DIST_BACKENDS:
            raise ConfigError(f"--mllm-dist-backend {self.dist_backend!r} is not one of {', '.join(DIST_BACKENDS)}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ConfigError(f"--mllm-controls {','.join(unknown)!r} is not one of {', '.join(CONTROLS)}")
        if self.update_baseline and not (self.baseline or self.save_baseline):
            raise ConfigError(
                "--mllm-update-baseline needs the file to write: add --mllm-baseline PATH "
                "(or --mllm-save-baseline PATH)"
            )
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError(f"--mllm-device {device!r} is not a device; use {DEVICE_HINT}")

    @property
    def control_permutations(self) -> int:
        """The permutations this run fits: as asked, else the probe's default."""
        if self.permutations is not None:
            return self.permutations
        return DEFAULT_PERMUTATIONS if self.probe == "linear" else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def parse_stage_overrides(text: str | None) -> dict[str, str]:
    """``vision=PATH,connector=PATH,llm=PATH`` -> dict."""
    if not text:
        return {}
    result: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"--mllm-stages {text!r}: {part!r} is not STAGE=PATH; write e.g. "
                "vision=model.vision_tower.encoder.layers,connector=model.multi_modal_projector"
            )
        result[key.strip()] = value.strip()
    return result
