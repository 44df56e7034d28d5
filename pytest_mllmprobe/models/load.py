"""Load a vision-language model with the transformers Auto classes, like a user would."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: ``--mllm-model package.module:function`` (an adapter entry point)
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: what the Hugging Face Trainer writes into a ``checkpoint-N`` folder besides the model
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth",
                 "scaler.pt")


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: ``label`` names the model in test ids, ``source`` is loaded."""

    label: str
    source: str
    is_demo: bool = False
    #: ``source`` is ``package.module:function`` returning a :class:`~.adapter.ModelAdapter`
    entry_point: bool = False


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    processor: Any
    device: Any
    dtype: Any
    #: the :class:`~.adapter.ModelAdapter` that loaded it and feeds it (``None``: transformers' way)
    adapter: Any = None


def resolve_model(name: str) -> ModelSpec:
    """Turn ``--mllm-model`` into a spec: ``demo``, a local folder, a hub id, or
    ``package.module:function`` (an adapter entry point, :mod:`.adapter`)."""
    if name == "demo":
        from ..demo import DEMO_MODEL

        return ModelSpec("demo", str(DEMO_MODEL), is_demo=True)
    path = Path(name).expanduser()
    if ENTRY_POINT.match(name) and not path.exists():
        return ModelSpec(name.rpartition(":")[2], name, entry_point=True)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            trainer = sorted(p.name for p in path.iterdir() if p.name in TRAINER_FILES)
            if trainer:
                raise ConfigError(
                    f"--mllm-model {name!r} holds training state only ({', '.join(trainer)}), no model: "
                    "neither config.json with weights (a full fine-tune saved by the Trainer) nor "
                    "adapter_config.json (a PEFT adapter); point --mllm-model at a checkpoint-N folder "
                    "that has them, or save the model with model.save_pretrained(path)"
                )
        if not path.is_dir() or not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise ConfigError(
                f"--mllm-model {name!r} is not a saved model: expected a folder with config.json "
                "(written by model.save_pretrained and processor.save_pretrained), a PEFT adapter "
                "folder with adapter_config.json, 'demo', or a "
                "hub id such as 'org/name'"
            )
        label = path.resolve().name
        return ModelSpec(label, str(path.resolve()))
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelSpec(name.split("/")[-1], name)
    raise ConfigError(
        f"--mllm-model {name!r} was not found: no such folder, and it is not a hub id; expected a "
        "local folder with config.json (from save_pretrained), 'demo' for the bundled model, "
        "a hub id such as 'org/name', or package.module:function returning a ModelAdapter"
    )


def load_config(spec: ModelSpec, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ConfigError(
                f"--mllm-model {spec.source!r} needs its own code from the model folder or hub; "
                "run again with --mllm-trust-remote-code if you trust it"
            ) from exc
        raise ConfigError(f"--mllm-model {spec.source!r}: cannot read its config: {text}") from exc
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: only local folders and cached hub models work)" if offline else ""
        raise ConfigError(
            f"--mllm-model {spec.source!r} could not be loaded{hint}: {_first_line(exc)}; expected a "
            "local folder with config.json or a reachable hub id"
        ) from exc


def load_structure(spec: ModelSpec, *, trust_remote_code: bool = False) -> Any:
    """The model's module tree on the ``meta`` device: no weights read, no memory used.

    Enough to detect the stages and name the loci at collection time.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    config = load_config(spec, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ConfigError(
            f"--mllm-model {spec.source!r} (model_type {getattr(config, 'model_type', '?')!r}) is "
            f"not an image-text-to-text model that AutoModelForImageTextToText can build: "
            f"{_first_line(exc)}"
        ) from exc


def pick_device(device: str, worker: str | None = None) -> Any:
    """``auto`` = a CUDA device when there is one, else the CPU.

    Under pytest-xdist (``worker`` = ``PYTEST_XDIST_WORKER``, e.g. ``gw3``) with several GPUs,
    ``auto`` pins worker ``gwN`` to GPU ``N mod count``, so workers extracting different models
    run on different GPUs.
    """
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        worker = os.environ.get("PYTEST_XDIST_WORKER") if worker is None else worker
        count = torch.cuda.device_count()
        match = re.fullmatch(r"gw(\d+)", worker or "")
        return torch.device("cuda", int(match.group(1)) % count if match and count > 1 else 0)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--mllm-device {device!r} asked for CUDA, but torch sees no GPU; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--mllm-device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc


def placement(model: Any, device: str, dtype: str, device_map: str | None = None) -> tuple[Any, Any]:
    """``(device, dtype)`` of a loaded model's inputs: the device of its input embeddings when
    accelerate spread it (``device_map``), else the asked one; the float type of its embeddings."""
    torch_device = pick_device(device)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if device_map is not None and weight is not None:
        torch_device = weight.device
    if weight is not None and weight.is_floating_point():
        return torch_device, weight.dtype
    return torch_device, pick_dtype(dtype, torch_device)


def pick_dtype(dtype: str, device: Any) -> Any:
    """``auto`` = float32 on the CPU, bfloat16 on a GPU that supports it."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_model(
    spec: ModelSpec, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load processor and weights (``AutoProcessor`` + ``AutoModelForImageTextToText``), eval mode.

    ``device_map`` (``auto``, ...) spreads the weights over the GPUs with accelerate; inputs
    then go to the device of the input embeddings and ``device`` only picks the dtype.
    """
    import importlib.util

    from transformers import AutoModelForImageTextToText, AutoProcessor

    load_config(spec, trust_remote_code)  # clear messages for missing/remote-code models
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            f"--mllm-device-map {device_map} needs the accelerate package: pip install 'pytest-mllmprobe[gpu]' "
            "(or pip install accelerate)"
        )
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    try:
        processor = AutoProcessor.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        processor = None
        # a part that images never use (the video processor) needs torchvision
        if isinstance(exc, ImportError) or "torchvision" in str(exc):
            try:
                processor = processor_without_video(spec.source, trust_remote_code)
            except (ImportError, OSError, ValueError, TypeError):
                processor = None
        if processor is None:
            raise ConfigError(
                f"--mllm-model {spec.source!r}: cannot load its processor with AutoProcessor: "
                f"{_first_line(exc)}; save it next to the model with processor.save_pretrained(path)"
            ) from exc
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            spec.source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **({"device_map": device_map} if device_map is not None else {}),
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--mllm-model {spec.source!r}: cannot load its weights with "
            f"AutoModelForImageTextToText: {_first_line(exc)}"
        ) from exc
    if device_map is None:
        model.to(torch_device)
    else:  # the inputs go where the first layer is; hooks move every pooled output to the CPU
        torch_device = model.get_input_embeddings().weight.device
    model.eval()
    return LoadedModel(spec, model, processor, torch_device, torch_dtype)


@contextlib.contextmanager
def video_slot_may_be_empty() -> Iterator[None]:
    """Let a processor with a video slot be built with ``video_processor=None``.

    Without torchvision, transformers cannot even check ``None`` against the video-processor
    class (it is a placeholder that raises ``ImportError``). Images never use that slot.
    """
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self: Any, name: str, argument: Any) -> Any:
        if name == "video_processor" and argument is None:
            return None
        return original(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def processor_without_video(source: str, trust_remote_code: bool = False) -> Any:
    """The saved processor built from its parts, with no video processor; ``None`` if it has
    no video slot.

    Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, InternVL and LLaVA-OneVision processors carry a
    video processor that needs torchvision, so ``AutoProcessor`` fails without it although
    images never touch it. The image processor (transformers falls back to its PIL version),
    the tokenizer, the chat template and the processor's own settings (``image_seq_length``,
    ``num_image_tokens``, ...) are loaded as ``AutoProcessor`` would load them.
    """
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    saved = _json_file(source, "processor_config.json")
    name = saved.get("processor_class") or _json_file(source, "preprocessor_config.json").get("processor_class")
    if not name:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        name = PROCESSOR_MAPPING_NAMES.get(getattr(load_config(ModelSpec(source, source), trust_remote_code),
                                                   "model_type", ""))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or "video_processor" not in cls.get_attributes():
        return None
    parts = set(cls.get_attributes()) | {"self", "chat_template", "kwargs"}
    own = {key: value for key, value in saved.items()
           if key in inspect.signature(cls.__init__).parameters and key not in parts}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    template = saved.get("chat_template") or getattr(tokenizer, "chat_template", None)
    with video_slot_may_be_empty():
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                   chat_template=template, **own)


def _json_file(source: str, name: str) -> dict[str, Any]:
    """A JSON file of a local folder or a (cached) hub repo; ``{}`` when it is absent."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return {}
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
