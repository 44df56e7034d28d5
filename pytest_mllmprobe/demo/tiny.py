"""Tiny, offline LLaVA-family models built from config classes (no hub download).

The models are real transformers architectures (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``VipLlavaForConditionalGeneration``) with a CLIP
vision tower and a Llama decoder, shrunk to a few hundred thousand parameters, together
with a matching processor: a word-level tokenizer, a CLIP (or LLaVA-NeXT) image processor
and a chat template. Saved with :func:`save_model`, they load back through
``AutoProcessor`` and ``AutoModelForImageTextToText`` like any hub checkpoint, which makes
them suitable for tests and for the bundled demo.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
"""Special tokens, in id order: ``<pad>`` is 0, ``<image>`` is 4."""

IMAGE_TOKEN = "<image>"

VOCAB_WORDS: tuple[str, ...] = (
    # chat-template roles
    "system", "user", "assistant",
    # the default question of ``prompts.DEFAULT_QUESTION``
    "classify", "the", "image", "options", "answer", "with", "one", "option",
    # common words of other classification questions
    "what", "which", "is", "this", "a", "an", "of", "in", "shown", "picture", "photo", "scan",
    "select", "choose", "class", "category", "following", "reply", "only", "word", "please",
    "yes", "no", "and", "or", "to", "from", "does", "show", "describe", "best",
    # class names: the demo's and a few used by tests
    "normal", "benign", "malignant", "cat", "dog", "bird", "cyst", "mass",
    "healthy", "disease", "tumor", "lesion", "pneumonia", "covid", "positive", "negative",
    # punctuation
    ".", ",", ":", ";", "?", "!", "-", "(", ")", "'", '"', "/",
)
"""Base vocabulary: covers the default prompt, chat roles, punctuation and class names."""

def chat_template(placeholder: str = "<image>") -> str:
    """A minimal chat template: ``role: <placeholder> text`` per turn, ``assistant:`` to generate."""
    return (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['content'] is string %}{{ m['content'] }} {% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + placeholder + " "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )


CHAT_TEMPLATE = chat_template(IMAGE_TOKEN)
"""The demo's chat template (image placeholder ``<image>``)."""

FAMILIES = ("llava", "llava_next", "vipllava")


def vocabulary(extra_words: Iterable[str] = (), specials: Sequence[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Token-to-id map: ``specials`` first, then :data:`VOCAB_WORDS`, then ``extra_words``.

    Extra words are lower-cased (the tokenizer lower-cases its input) and de-duplicated.
    """
    vocab: dict[str, int] = {}
    for token in (*specials, *VOCAB_WORDS, *(w.lower() for w in extra_words)):
        if token and token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def build_tokenizer(
    extra_words: Iterable[str] = (),
    *,
    specials: Sequence[str] = SPECIAL_TOKENS,
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int = 512,
) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`.

    Input is lower-cased and split on whitespace and on every punctuation character; words
    outside the vocabulary become ``<unk>``. A ``<s>`` is prepended to every sequence and
    padding is on the left. ``specials`` must start with ``<pad> <s> </s> <unk>``; by default
    ``<image>`` follows and is registered as the ``image_token`` so that transformers
    processors find it (``extra_special_tokens`` replaces that registration).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(extra_words, specials)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    core.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if extra_special_tokens is None else extra_special_tokens,
        padding_side="left",
        model_max_length=model_max_length,
    )


def tiny_llava(
    family: str = "llava",
    *,
    vision_layers: int = 3,
    text_layers: int = 4,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    extra_words: Iterable[str] = (),
    seed: int = 0,
    vision_feature_layer: int | list[int] | None = -2,
) -> tuple[Any, Any]:
    """A randomly initialised tiny LLaVA-family model and its processor.

    ``family`` is ``"llava"``, ``"llava_next"`` (images are tiled over
    ``image_grid_pinpoints`` of one or two tiles, plus the whole image) or ``"vipllava"``
    (the projector concatenates several vision layers). The vision tower is CLIP (with a
    class token, dropped before the projector), the language model is Llama with untied
    embeddings; ``text_hidden`` must be a multiple of 8 (4 heads with even head size).

    ``vision_feature_layer`` indexes the vision tower's ``hidden_states`` (entry 0 is the
    embeddings, entry ``i`` the output of encoder block ``i - 1``; -2 is the penultimate
    block), as in the transformers configs; ``None`` means -2. For ``vipllava`` a single
    index is widened to ``[vision_feature_layer, 1]`` (it also reads the first block) and a
    list is used as given.

    Weights are drawn after ``torch.manual_seed(seed)``, so the same arguments give the
    same model. ``extra_words`` are added to the vocabulary (for class names of tests).
    Returns ``(model, processor)``, the model in eval mode.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if vision_hidden % 4 or text_hidden % 8:
        raise ValueError("vision_hidden must be a multiple of 4 and text_hidden a multiple of 8 (4 heads)")

    tokenizer = build_tokenizer(extra_words)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    builder = {"llava": _llava, "llava_next": _llava_next, "vipllava": _vipllava}[family]
    config, processor = builder(
        vision_config, text_config, tokenizer, image_token_id, image_size, patch_size, vision_feature_layer
    )
    config.tie_word_embeddings = False
    config.pad_token_id = tokenizer.pad_token_id

    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.eval()
    return model, processor


def save_model(model: Any, processor: Any, path: str | Path) -> Path:
    """Save model weights (safetensors) and processor into ``path``; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _clip_image_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _llava(vision_config, text_config, tokenizer, image_token_id, image_size, patch_size, feature_layer):
    from transformers import LlavaConfig, LlavaProcessor

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=-2 if feature_layer is None else feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return config, processor


def _llava_next(vision_config, text_config, tokenizer, image_token_id, image_size, patch_size, feature_layer):
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=-2 if feature_layer is None else feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return config, processor


def _vipllava(vision_config, text_config, tokenizer, image_token_id, image_size, patch_size, feature_layer):
    from transformers import LlavaProcessor, VipLlavaConfig

    if feature_layer is None:
        feature_layer = -2
    if isinstance(feature_layer, int):
        # hidden_states has num_hidden_layers + 1 entries (embeddings first)
        first_block = 1 - (vision_config.num_hidden_layers + 1)
        layers = [feature_layer] if feature_layer in (1, first_block) else [feature_layer, 1]
    else:
        layers = [int(layer) for layer in feature_layer]
    config = VipLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=layers,
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    # VipLlava always drops the CLS token: that is the "default" strategy for the processor.
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return config, processor
