"""Checkpoints written by the original LLaVA code, loaded as transformers' LLaVA.

HuatuoGPT-Vision-34B, LLaVA-Med and the liuhaotian LLaVA-1.5 releases were saved by the original
LLaVA repository, not by transformers: ``config.json`` is the language model's own flat config
plus ``mm_*`` keys (``model_type`` ``llava_llama``, ``llava_qwen2``, ``llava_mistral``, or ``llava``
with ``LlavaLlamaForCausalLM``), the vision tower and the projector live inside ``model``, and the
image is spliced in at a token id (-200) that no tokenizer knows. No transformers class reads
them, so they are converted on load, without the original repository:

* config: ``LlavaConfig`` with the flat keys as its text config, the vision config of the tower
  (``mm_vision_tower``: a folder, a path relative to the checkpoint, or a hub id in the local
  cache), ``vision_feature_layer = mm_vision_select_layer`` and the feature strategy from
  ``mm_vision_select_feature`` (``patch`` drops the class token, ``cls_patch`` keeps it);
* weights: ``model.vision_tower.vision_tower.*`` -> ``model.vision_tower.*`` (from the tower's own
  folder when the checkpoint does not hold them, as the original loader does),
  ``model.mm_projector.0/2`` -> ``model.multi_modal_projector.linear_1/2``, the decoder under
  ``model.language_model``; ``lm_head`` unchanged;
* the image token: ``<image>`` is added to the tokenizer; when its id falls past the embedding
  matrix, one embedding row is added and the LM head keeps its rows, so every logit, and thus
  the answer's scores, equal the original model's;
* the processor: the tokenizer, the tower's CLIP image processor (or the checkpoint's own), and
  the tokenizer's chat template or LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``.

Only the projector the transformers class has is supported (``mlp2x_gelu``); others are refused
with the adapter entry point as the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .adapter import ModelAdapter

#: ``model_type`` of the original code -> the transformers ``model_type`` of its language model
TEXT_TYPES = {
    "llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen2": "qwen2",
    "llava_qwen": "qwen2",
}
PROJECTORS = ("mlp2x_gelu",)
IMAGE_TOKEN = "<image>"
#: LLaVA-1.5's conversation format (vicuna_v1) as a chat template, for tokenizers without one
LLAVA_15_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: {{ m['content'] if m['content'] is string "
    "else m['content'][0]['text'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: keys of the original config that are no part of the language model's own config
_NOT_TEXT = ("architectures", "model_type", "auto_map", "transformers_version", "_name_or_path")


def raw_config(source: str) -> dict[str, Any]:
    """``config.json`` of a local folder as a dict (``{}`` for hub ids and unreadable files)."""
    path = Path(source) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_llava_original(raw: dict[str, Any]) -> bool:
    """The config was written by the original LLaVA code (``mm_*`` keys beside a flat LM config)."""
    return "mm_vision_tower" in raw and "text_config" not in raw


def _text_type(raw: dict[str, Any], source: str) -> str:
    kind = str(raw.get("model_type", ""))
    if kind in TEXT_TYPES:
        return TEXT_TYPES[kind]
    for arch in raw.get("architectures") or []:
        for name, text in (("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2")):
            if name in str(arch):
                return text
    raise ConfigError(
        f"--mllm-model {source!r}: a LLaVA-original checkpoint (mm_vision_tower in config.json) with "
        f"model_type {kind!r}, whose language model is none of {', '.join(sorted(set(TEXT_TYPES.values())))}; "
        "load it through your own adapter (--mllm-model module:function, docs/architectures.md)"
    )


def tower_folder(raw: dict[str, Any], source: str) -> str:
    """Where the vision tower's config, weights and image processor are: ``mm_vision_tower`` as a
    folder, a path inside the checkpoint (HuatuoGPT: ``./vit/...``), or a hub id already cached."""
    tower = str(raw.get("mm_vision_tower") or "")
    for candidate in (Path(tower).expanduser(), Path(source) / tower):
        if tower and (candidate / "config.json").is_file():
            return str(candidate.resolve())
    try:
        from transformers.utils import cached_file

        found = cached_file(tower, "config.json", _raise_exceptions_for_missing_entries=False) if tower else None
    except (OSError, ValueError):
        found = None
    if found:
        return str(Path(found).parent)
    raise ConfigError(
        f"--mllm-model {source!r}: config.json key mm_vision_tower = {tower!r} names a vision tower that is "
        "neither a folder (absolute or inside the checkpoint) nor a hub model in the local cache; download it "
        "(huggingface-cli download " + (tower or "<tower>") + ") or set mm_vision_tower to its folder"
    )


def convert_config(source: str, raw: dict[str, Any] | None = None, tokenizer: Any = None) -> Any:
    """The ``LlavaConfig`` of a LLaVA-original checkpoint."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    raw = raw_config(source) if raw is None else raw
    projector = raw.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        raise ConfigError(
            f"--mllm-model {source!r}: config.json key mm_projector_type = {projector!r}; LLaVA-original "
            f"checkpoints load with {', '.join(PROJECTORS)} projectors (transformers' LLaVA has no other); "
            "load this one through your own adapter (--mllm-model module:function, docs/architectures.md)"
        )
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(
            f"--mllm-model {source!r}: config.json key mm_vision_select_feature = {feature!r}; expected "
            "'patch' (class token dropped) or 'cls_patch'"
        )
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in _NOT_TEXT}
    text_config = AutoConfig.for_model(_text_type(raw, source), **text)
    try:
        vision_config = CLIPVisionConfig.from_pretrained(tower_folder(raw, source))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--mllm-model {source!r}: cannot read the vision tower's config: {exc}") from exc
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision_config.hidden_size:
        raise ConfigError(
            f"--mllm-model {source!r}: config.json key mm_hidden_size = {mm_hidden}, but the vision tower "
            f"({raw.get('mm_vision_tower')!r}) has hidden size {vision_config.hidden_size}: not the tower it was "
            "trained with"
        )
    config = LlavaConfig(
        text_config=text_config, vision_config=vision_config,
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        projector_hidden_act="gelu",
        image_token_index=int((tokenizer or tokenizer_with_image_token(source)).convert_tokens_to_ids(IMAGE_TOKEN)),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    config.mm_vision_select_layer = config.vision_feature_layer  # shown in the summary as the original key
    return config


def tokenizer_with_image_token(source: str) -> Any:
    """The checkpoint's tokenizer, with ``<image>`` added where it lacks one."""
    from transformers import AddedToken, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--mllm-model {source!r}: cannot load its tokenizer: {exc}") from exc
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def renamed(key: str) -> str | None:
    """A state-dict key of the original layout as transformers' LLaVA names it (None: dropped)."""
    if key.endswith((".inv_freq", "position_ids")) or key == "model.image_newline":
        return None
    for old, new in (
        ("model.vision_tower.vision_tower.", "model.vision_tower."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def read_weights(folder: str) -> dict[str, Any]:
    """Every tensor of a folder's ``*.safetensors`` files (``*.bin`` with ``weights_only``)."""
    import torch
    from safetensors.torch import load_file

    root = Path(folder)
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    tensors: dict[str, Any] = {}
    for path in files:
        if path.suffix == ".safetensors":
            tensors.update(load_file(str(path)))
        else:  # what transformers does with .bin checkpoints: tensors only, no code
            tensors.update(torch.load(str(path), map_location="cpu", weights_only=True))
    return tensors


def load(source: str, dtype: Any) -> tuple[Any, Any]:
    """``(model, processor)``: the checkpoint as a ``LlavaForConditionalGeneration``, eval mode."""
    import torch
    from transformers import LlavaForConditionalGeneration

    raw = raw_config(source)
    tokenizer = tokenizer_with_image_token(source)
    config = convert_config(source, raw, tokenizer)
    weights = {}
    for key, value in read_weights(source).items():
        new = renamed(key)
        if new is not None:
            weights[new] = value
    if not any(k.startswith("model.vision_tower.") for k in weights):  # the tower's own weights
        for key, value in read_weights(tower_folder(raw, source)).items():
            if not key.startswith(("text_model.", "logit_scale", "text_projection", "visual_projection")):
                weights["model.vision_tower." + key] = value
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5 releases
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # real buffers (rotary frequencies, position ids), weights left to the checkpoint
        model = LlavaForConditionalGeneration(config)
    embed_key = "model.language_model.embed_tokens.weight"
    rows = weights[embed_key].shape[0] if embed_key in weights else 0
    if "lm_head.weight" not in weights and embed_key in weights:  # tied in the original
        weights["lm_head.weight"] = weights[embed_key]
    if rows and config.image_token_id >= rows:  # one row for <image>; its embedding is replaced by the image
        embed = weights[embed_key]
        weights[embed_key] = torch.cat([embed, embed.mean(0, keepdim=True)])
        model.model.language_model.embed_tokens = torch.nn.Embedding(rows + 1, embed.shape[1])
    # CLIP's own prefix: ``vision_model.`` in transformers 4 saves, none in transformers 5
    expected = set(model.state_dict())
    inner = "model.vision_tower.vision_model."
    for key in [k for k in weights if k.startswith(inner) and k not in expected]:
        weights["model.vision_tower." + key[len(inner):]] = weights.pop(key)
    missing, unexpected = _load_state(model, weights)
    if missing or unexpected:
        raise ConfigError(
            f"--mllm-model {source!r}: the LLaVA-original weights do not fit transformers' LLaVA: "
            + (f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "")
        )
    model.to(dtype).eval()
    return model, processor(source, raw, config, tokenizer)


def _load_state(model: Any, weights: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Load ``weights`` in place; the missing parameters and the unexpected keys (buffers the
    checkpoint does not hold keep the values the model computed for them)."""
    result = model.load_state_dict(weights, strict=False, assign=True)
    buffers = {name for name, _ in model.named_buffers()}
    return [k for k in result.missing_keys if k not in buffers], list(result.unexpected_keys)


def processor(source: str, raw: dict[str, Any], config: Any, tokenizer: Any) -> Any:
    """A ``LlavaProcessor``: the checkpoint's tokenizer with ``<image>``, the tower's image processor."""
    from transformers import AutoImageProcessor, LlavaProcessor

    root = Path(source)
    images_from = source if (root / "preprocessor_config.json").is_file() else tower_folder(raw, source)
    image_processor = AutoImageProcessor.from_pretrained(images_from)
    if raw.get("image_aspect_ratio") == "pad" and hasattr(image_processor, "do_pad"):
        image_processor.do_pad = True
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=getattr(tokenizer, "chat_template", None) or LLAVA_15_TEMPLATE,
    )


class LlavaOriginalAdapter(ModelAdapter):
    """A LLaVA-original checkpoint, converted on load; fed and read as transformers' ``llava``."""

    def config(self) -> Any:
        return convert_config(self.source)

    def structure(self) -> Any:
        import torch
        from transformers import AutoModelForImageTextToText

        config = self.config()
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config)

    def load(self, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> tuple[Any, Any]:
        from .load import pick_device, pick_dtype

        if device_map is not None:
            raise ConfigError(
                f"--mllm-model {self.source!r}: --mllm-device-map is not available for LLaVA-original "
                "checkpoints (converted on load); use --mllm-device"
            )
        torch_device = pick_device(device)
        model, processor = load(self.source, pick_dtype(dtype, torch_device))
        return model.to(torch_device), processor
